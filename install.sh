#!/usr/bin/env bash
# Creates .venv here and installs meshserve into it: `./install.sh` for running it,
# `./install.sh test` with the test tools too.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/pip install -e ".${1:+[$1]}"
# xds-protos carries an old copy of the OpenTelemetry protos in the same files as
# opentelemetry-proto, and whichever pip installs last wins; the trace exporter needs the
# latter's. (The version is the one pyproject.toml pins.)
otel=$(sed -n 's/.*"\(opentelemetry-proto==[^"]*\)".*/\1/p' pyproject.toml)
.venv/bin/pip install --no-deps --force-reinstall --quiet "$otel"
