# The one meshserve image: every service (`meshserve <service>`) and the tools. The charts run it as
# uid 10001 with a read-only root filesystem (HOME and caches in /tmp).
#
# Not built in CI here (no Docker engine on the development machines); skaffold builds it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, pinned to the project's version, so that installing the project finds it
# satisfied and never pulls another build. PyPI's Linux wheel is the CUDA build (several GB;
# it also runs on CPUs). For a CPU-only image use PyTorch's CPU index, which skaffold's `cpu`
# profile passes:
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_INDEX_URL=""
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" torch==2.13.0; \
    else \
        pip install torch==2.13.0; \
    fi

# Then the project (its generated gRPC code is committed under services/protocol).
WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
COPY mesh ./mesh
COPY tools ./tools
RUN pip install . \
    && pip install --no-deps --force-reinstall \
        "$(sed -n 's/.*"\(opentelemetry-proto==[^"]*\)".*/\1/p' pyproject.toml)" \
    && python3 -c "import torch; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__" \
    && rm -rf /src

RUN groupadd --system --gid 10001 meshserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/meshserve --create-home \
        --shell /usr/sbin/nologin meshserve
USER 10001:10001
WORKDIR /home/meshserve

ENTRYPOINT ["meshserve"]
CMD ["--help"]
