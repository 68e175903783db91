"""`meshserve bench relay`: what a hop costs with nothing of meshserve's inside it.

A driver sends messages over one bidirectional stream to a relay; the relay forwards each over
its own long-lived stream to an echo server and sends the echo's answer back. That is the shape
of the mesh's internal hops (router, batcher: one group in, one out, one answer back, one out),
on the services' gRPC server (meshserve.common.http2_server), on uvloop with mutual TLS and the
services' server options, and with none of their work. One message is in flight at a time. The
relay calls the echo with `--client`: `http2`, the project's own client
(meshserve.common.http2_client), as the ingress calls the router and a batcher its computes; or
`grpc`, a `grpc.aio` channel, as the router calls its batchers (xDS).

The relay's and the echo's CPU per message (utime + stime from /proc) is the floor under a hop's
CPU per group. It is measured twice: back to back, as under load, and paced (one message every
`--pace-ms`), as at concurrency 1, where every process sleeps between messages and each message
has to wake them again. Last, the driver calls the echo itself, paced as before: the p50
the relay adds over that one, in its p50s, is the floor under what `bench budget` measures as
the p50 a hop adds at concurrency 1 (in bare p50s).

    meshserve bench relay [--messages 2000] [--paced-messages 300] [--size 11000] [--pace-ms 10]
                          [--client http2|grpc]

The relay and the echo run as `python -m meshserve.tools.bench_relay relay|echo --tls-dir D
--port-file F [--upstream PORT] [--client http2|grpc]`, on 127.0.0.1, until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import uvloop

from meshserve.common.http2_client import Http2Channel, client_ssl_context
from meshserve.common.http2_server import Http2Server, server_ssl_context
from meshserve.common.server import SERVER_OPTIONS
from meshserve.common.tls import TlsFiles, secure_channel
from meshserve.tools.arguments import positive_float, positive_int
from meshserve.tools.budget_bare import serve_until_signalled
from meshserve.tools.budget_proc import cpu_ticks, start_server, stop_process
from meshserve.tools.certs import init_certs

METHOD = "/meshserve.bench.Relay/Stream"
HOST = "127.0.0.1"
WARMUP_MESSAGES = 200
# Who presents which certificate: the driver calls the relay as the ingress calls the router,
# the relay calls the echo as the router calls a batcher.
IDENTITY = {"echo": "batcher", "relay": "router"}
NO_RELAY = "no relay"  # the driver calling the echo itself
CLIENTS = ("http2", "grpc")
# The pause after each paced answer: about a concurrency-1 mlp request's round trip through
# the mesh, so that each process sleeps between messages as it does between requests there.
PACE_MS = 10.0


def _handler(stream) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler("meshserve.bench.Relay", {
        "Stream": grpc.stream_stream_rpc_method_handler(stream)})  # bytes in, bytes out


async def _echo(request_iterator, context: grpc.aio.ServicerContext) -> None:
    while (message := await context.read()) is not grpc.aio.EOF:
        await context.write(message)


def _relay_to(upstream: str, tls: TlsFiles, client: str):
    if client == "grpc":
        channel = secure_channel(upstream, tls, IDENTITY["echo"])
    else:
        channel = Http2Channel(upstream, client_ssl_context(tls), IDENTITY["echo"])

    async def relay(request_iterator, context: grpc.aio.ServicerContext) -> None:
        call = channel.stream_stream(METHOD)()
        while (message := await context.read()) is not grpc.aio.EOF:
            await call.write(message)
            await context.write(await call.read())
        await call.done_writing()

    return relay


async def serve(role: str, tls_dir: Path, port_file: Path, upstream: str,
                client: str = CLIENTS[0]) -> None:
    tls = TlsFiles.for_identity(tls_dir, IDENTITY[role])
    server = Http2Server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers([_handler(_echo if role == "echo"
                                              else _relay_to(upstream, tls, client))])
    port = server.add_secure_port(f"{HOST}:0", server_ssl_context(tls))
    await serve_until_signalled(server, port, port_file)


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass(frozen=True)
class Phase:
    """One run of messages through the relay: CPU per message in µs, round trip p50 in ms."""

    name: str
    messages: int
    relay_us: float
    echo_us: float
    p50_ms: float


def per_message_us(ticks_before: int, ticks_after: int, hz: int, messages: int) -> float:
    return (ticks_after - ticks_before) / hz / messages * 1e6


async def _drive(target: str, server: str, tls: TlsFiles, size: int,
                 runs: list[tuple[int, float]], measured) -> list[list[float]]:
    """Each run sends `count` messages of `size` bytes to `target` (whose certificate names
    `server`), `pause` seconds apart, one in flight; `measured()` is called before and after
    each run. Returns each run's round trips (s)."""
    async with secure_channel(target, tls, server) as channel:
        call = channel.stream_stream(METHOD)()
        rounds = []
        for count, pause in runs:
            measured()
            times = []
            for n in range(count):
                message = n.to_bytes(8, "little") + bytes(max(size - 8, 0))
                sent = time.perf_counter()
                await call.write(message)
                if await call.read() != message:
                    raise RuntimeError(f"message {n} came back changed")
                times.append(time.perf_counter() - sent)
                if pause:
                    await asyncio.sleep(pause)
            measured()
            rounds.append(times)
        await call.done_writing()
    return rounds


def measure(size: int, messages: int, paced_messages: int, pace_s: float,
            work_dir: Path, client: str = CLIENTS[0]) -> list[Phase]:
    tls_dir = work_dir / "tls"
    init_certs(tls_dir)
    processes, address = {}, {"echo": ""}
    try:
        for role in ("echo", "relay"):
            port_file = work_dir / f"{role}.port"
            processes[role], port = start_server(
                ["-m", "meshserve.tools.bench_relay", role, f"--tls-dir={tls_dir}",
                 f"--port-file={port_file}", f"--upstream={address['echo']}",
                 f"--client={client}"],
                port_file, work_dir / f"{role}.log", f"the {role}")
            address[role] = f"{HOST}:{port}"
        readings: list[dict[str, int]] = []  # before and after each run, in turn

        def read() -> None:
            readings.append({role: cpu_ticks(p.pid) or 0 for role, p in processes.items()})

        driver = TlsFiles.for_identity(tls_dir, "ingress")

        async def drive() -> list[list[float]]:
            through = await _drive(address["relay"], IDENTITY["relay"], driver, size, [
                (WARMUP_MESSAGES, 0.0), (messages, 0.0), (paced_messages, pace_s)], read)
            straight = await _drive(address["echo"], IDENTITY["echo"], driver, size, [
                (WARMUP_MESSAGES, 0.0), (paced_messages, pace_s)], read)
            return through + straight

        rounds = uvloop.run(drive())
    finally:
        for process in processes.values():
            stop_process(process, 10.0)
    hz = os.sysconf("SC_CLK_TCK")
    phases = []
    paced = f"paced every {pace_s * 1e3:g} ms"
    for index, name in ((1, "back to back"), (2, paced), (4, f"{paced}, {NO_RELAY}")):
        before, after, answered = readings[2 * index], readings[2 * index + 1], rounds[index]
        relay, echo = (per_message_us(before[role], after[role], hz, len(answered))
                       for role in ("relay", "echo"))
        phases.append(Phase(name, len(answered), relay, echo,
                            statistics.median(answered) * 1e3))
    return phases


def report(phases: list[Phase], size: int, client: str = CLIENTS[0]) -> str:
    tight, paced, straight = phases
    calls = "the project's HTTP/2 client" if client == "http2" else "a grpc.aio channel"
    lines = [f"relay floor: the services' server, the relay calling the echo on {calls}, "
             f"uvloop, mutual TLS, {size}-byte messages, one in flight",
             f"{'':30}{'messages':>9}{'relay µs/msg':>14}{'echo µs/msg':>13}"
             f"{'round trip p50':>16}"]
    lines += [f"{p.name:30}{p.messages:>9}{p.relay_us:>14.0f}{p.echo_us:>13.0f}"
              f"{p.p50_ms:>13.3f} ms" for p in phases]
    ratio = [paced.relay_us / tight.relay_us if tight.relay_us else float("nan"),
             paced.echo_us / tight.echo_us if tight.echo_us else float("nan")]
    lines.append(f"{'paced / back to back':30}{'':>9}{ratio[0]:>13.2f}x{ratio[1]:>12.2f}x")
    lines.append(f"the relay adds {paced.p50_ms - straight.p50_ms:.3f} ms to the paced p50: "
                 f"{relay_adds(phases):.2f}x the p50 with {NO_RELAY}")
    return "\n".join(lines)


def relay_adds(phases: list[Phase]) -> float:
    """The p50 the relay adds to a paced round trip, in p50s of the echo called with no
    relay (as `bench budget` gives the p50 a hop adds in bare p50s)."""
    _, paced, straight = phases
    return (paced.p50_ms - straight.p50_ms) / straight.p50_ms if straight.p50_ms else float("nan")


def _cmd_relay(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="meshserve-relay-") as work:
        phases = measure(args.size, args.messages, args.paced_messages, args.pace_ms / 1e3,
                         Path(work), args.client)
    if args.json:
        print(json.dumps({"size": args.size, "client": args.client,
                          "phases": [asdict(p) for p in phases],
                          "relay_adds_round_trips": relay_adds(phases)}))
    else:
        print(report(phases, args.size, args.client))
    return 0


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds ``relay`` to ``meshserve bench``'s subcommands."""
    parser = commands.add_parser(
        "relay", help="CPU per message of a bare gRPC relay, back to back and paced",
        description="Drives a bare relay and echo server (the services' gRPC server, mutual "
        "TLS, one message in flight) and prints their CPU per message, back to back and "
        "paced: the floor under each internal hop's CPU per group.")
    parser.add_argument("--messages", type=positive_int, default=2000,
                        help="messages sent back to back (default 2000)")
    parser.add_argument("--paced-messages", type=positive_int, default=300,
                        help="messages sent paced (default 300)")
    parser.add_argument("--pace-ms", type=positive_float, default=PACE_MS,
                        help=f"pause after each paced answer, ms (default {PACE_MS:g}: about "
                        "a concurrency-1 mlp request's round trip through the mesh)")
    parser.add_argument("--size", type=positive_int, default=11_000,
                        help="bytes per message (default 11000: a group of ten mlp requests)")
    parser.add_argument("--client", choices=CLIENTS, default=CLIENTS[0],
                        help="how the relay calls the echo: http2, the project's own client "
                        "(as the ingress and the batchers call; default), or grpc, a grpc.aio "
                        "channel (as the router calls)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.set_defaults(func=_cmd_relay)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshserve.tools.bench_relay",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=sorted(IDENTITY))
    parser.add_argument("--tls-dir", type=Path, required=True)
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--upstream", default="", help="the echo's HOST:PORT (relay only)")
    parser.add_argument("--client", choices=CLIENTS, default=CLIENTS[0],
                        help="how the relay calls the echo (relay only)")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.role, args.tls_dir, args.port_file, args.upstream, args.client))
    return 0


if __name__ == "__main__":
    sys.exit(main())
