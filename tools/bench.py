"""`meshserve bench`: `run` a load and print its JSON result line, `plot` latency against
throughput from such lines, and the `compare` and `budget` commands (their own modules).
The load itself is `meshserve.tools.load.run_load`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from meshserve.tools.arguments import positive_int
from meshserve.tools.load import run_load
from meshserve.tools.load_spec import DEFAULT_STREAMS, LoadSpec


def _header(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip().lower(), value


def _spec_from_args(args: argparse.Namespace) -> LoadSpec:
    return LoadSpec(
        target=args.target,
        model=args.model,
        version=args.version,
        concurrency=args.concurrency or 1,
        rate=args.rate or 0.0,
        stream=args.stream,
        duration_s=args.duration,
        warmup_s=args.warmup,
        max_requests=args.requests,
        batch=args.batch,
        ca=args.ca,
        cert=args.cert,
        key=args.key,
        server_name=args.server_name,
        headers=tuple(args.header),
        processes=args.processes,
        max_outstanding=args.max_outstanding,
        streams=args.streams,
        protocol=args.protocol,
        encoding=args.encoding,
    )


def _human(result: dict) -> str:
    load = (
        f"rate {result['rate']:g}/s" if result["mode"] == "open" else f"c={result['concurrency']}"
    )
    latency = result["latency_ms"]
    if latency["p50"] is None:
        timing = "no successful requests"
    else:
        timing = f"p50 {latency['p50']:.3f} p99 {latency['p99']:.3f} max {latency['max']:.3f} ms"
    parts = [
        f"bench {result['model']} {result['mode']}/{result['transport']} {load}:",
        f"{result['requests']} ok in {result['duration_s']:.2f} s",
        f"= {result['throughput_rps']:.1f} req/s;",
        f"{timing};",
        f"errors {result['errors'] or 0};",
    ]
    if result["mode"] == "open":
        parts.append(f"dropped {result['dropped']};")
    parts.append(f"client cpu {result['client_cpu_s']:.2f} s")
    return " ".join(parts)


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        spec = _spec_from_args(args)
        result = run_load(spec)
    except (ValueError, RuntimeError, OSError) as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    line = json.dumps(result, sort_keys=False)
    print(line, flush=True)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with args.output.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    print(_human(result), file=sys.stderr)
    return 0 if result["requests"] > 0 else 1


def _cmd_plot(args: argparse.Namespace) -> int:
    results = [json.loads(line) for line in args.results.read_text().splitlines()
               if line.strip()]
    results = [r for r in results if r.get("requests")]
    if not results:
        print(f"bench: no results with requests in {args.results}", file=sys.stderr)
        return 2
    from meshserve.tools.plots import plot_results  # matplotlib: when plotting

    plot_results(results, args.out)
    print(f"plot: {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``bench run``, ``plot``, ``compare``, ``budget`` and ``relay`` to a CLI's subparsers."""
    bench = subparsers.add_parser(
        "bench",
        description="Closed-loop and open-loop load for any Open Inference Protocol gRPC server.",
    )
    commands = bench.add_subparsers(dest="bench_command", metavar="COMMAND", required=True)
    run = commands.add_parser(
        "run",
        help="run a load and print one JSON result line",
        description="Runs a load; prints one JSON line on stdout and a summary on stderr.",
    )
    connection = run.add_argument_group("connection")
    connection.add_argument("--target", required=True, help="HOST:PORT of the server")
    connection.add_argument(
        "--protocol", choices=("grpc", "http"), default="grpc",
        help="gRPC (default) or HTTP/REST (closed loop, one process)")
    connection.add_argument(
        "--encoding", choices=("binary", "json"), default="binary",
        help="HTTP: tensors as binary tensor data (default) or as JSON")
    connection.add_argument("--ca", type=Path, help="CA bundle: use TLS (plaintext without)")
    connection.add_argument("--cert", type=Path, help="client certificate (mutual TLS)")
    connection.add_argument("--key", type=Path, help="client private key (mutual TLS)")
    connection.add_argument("--server-name", default="", help="TLS target name override")
    connection.add_argument(
        "--header",
        type=_header,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra request metadata (repeatable)",
    )
    request = run.add_argument_group("request")
    request.add_argument("--model", required=True, help="model name")
    request.add_argument("--version", default="", help="model version (default: server's)")
    request.add_argument(
        "--batch", type=positive_int, default=1, help="size of a -1 first dimension (default 1)"
    )
    load = run.add_argument_group("load")
    mode = load.add_mutually_exclusive_group()
    mode.add_argument(
        "--concurrency",
        type=positive_int,
        help="closed loop: N workers, one request outstanding each (default 1)",
    )
    mode.add_argument("--rate", type=float, help="open loop: Poisson arrivals per second")
    load.add_argument(
        "--max-outstanding",
        type=positive_int,
        default=1024,
        help="open loop: in-flight bound; arrivals over it are dropped (default 1024)",
    )
    load.add_argument("--stream", action="store_true", help="use ModelStreamInfer")
    load.add_argument(
        "--streams",
        type=int,
        default=0,
        help=f"open loop with --stream: streams per process (default {DEFAULT_STREAMS})",
    )
    load.add_argument("--duration", type=float, default=10.0, help="measured seconds (default 10)")
    load.add_argument(
        "--warmup", type=float, default=2.0, help="seconds before measuring (default 2)"
    )
    load.add_argument(
        "--requests",
        type=int,
        default=0,
        help="stop after N measured requests (successes plus errors) or at --duration, "
        "whichever is first",
    )
    load.add_argument(
        "--processes",
        type=positive_int,
        default=1,
        help="client processes sharing the load (default 1)",
    )
    run.add_argument("--output", type=Path, help="also append the JSON line to this file")
    run.set_defaults(func=_cmd_run)
    plot = commands.add_parser(
        "plot", help="plot latency against throughput from `bench run --output` lines")
    plot.add_argument("results", type=Path, help="a file of `bench run` JSON lines")
    plot.add_argument("--out", type=Path, default=Path("latency-throughput.png"))
    plot.set_defaults(func=_cmd_plot)

    from meshserve.tools import bench_compare, bench_relay, budget_run

    bench_compare.add_parser(commands)
    budget_run.add_parser(commands)
    bench_relay.add_parser(commands)


def main(argv: list[str] | None = None) -> int:
    """``python -m meshserve.tools.bench run --target ... --model ...``."""
    parser = argparse.ArgumentParser(prog="meshserve")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

