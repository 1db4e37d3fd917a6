"""The `edgeline` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
from pathlib import Path

from edgeline.firmware.edgeline_node import VERSION


def _demo(args: argparse.Namespace) -> int:
    from edgeline.host.demo import DemoOptions, run_demo

    opts = DemoOptions(
        duration=args.duration,
        nodes=args.nodes,
        broker=args.broker,
        json_path=args.json,
        window_ms=args.window_ms,
        fault=args.fault,
        fault_node=args.fault_node,
        fault_at=args.fault_at,
        opcua_port=args.opcua_port,
        live=not args.no_live,
    )
    summary = run_demo(opts)
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


def _gateway_run(args: argparse.Namespace) -> int:
    from edgeline.host.gateway import Gateway
    from edgeline.host.gateway_config import GatewayConfigError, load

    try:
        cfg = load(args.config)
    except GatewayConfigError as e:
        print(f"edgeline gateway: {e}", file=sys.stderr)
        return 2

    async def main() -> None:
        gw = Gateway(cfg)
        await gw.start()
        # asyncua's start-up leaves ~500k objects; freezing them keeps full collections from
        # stalling the loop for 100-200 ms later (measured: the worst latency outliers).
        gc.collect()
        gc.freeze()
        print(
            f"gateway up: MQTT {cfg.broker_host}:{cfg.broker_port}, OPC-UA {gw.opcua.endpoint}",
            file=sys.stderr,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await gw.drain()
        await gw.stop()

    from edgeline.host.opcua_security import SecurityConfigError

    try:
        asyncio.run(main())
    except (SecurityConfigError, ConnectionError) as e:
        print(f"edgeline gateway: {e}", file=sys.stderr)
        return 2
    return 0


def _node_sim(args: argparse.Namespace) -> int:
    from edgeline.host.virtual_node import FIRMWARE_DIR, micropython_binary

    exe = micropython_binary()
    env = dict(os.environ, MICROPYPATH=f"{FIRMWARE_DIR}:.frozen")
    argv = [exe]
    if args.heapsize:
        argv += ["-X", f"heapsize={args.heapsize}"]
    argv += [str(FIRMWARE_DIR / "main.py"), str(args.config.resolve())]
    # The node is the whole job: become it, so signals and exit codes are its own.
    os.execvpe(exe, argv, env)
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeline", description=__doc__)
    p.add_argument("--version", action="version", version=f"edgeline {VERSION}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser(
        "demo",
        help="run the whole pipeline on this machine",
        description="Embedded broker, virtual nodes, gateway, OPC-UA server and client; "
        "a fault is switched on in one machine partway through.",
    )
    d.add_argument(
        "--duration", type=float, default=60.0, help="seconds to run; 0 = until Ctrl-C (default 60)"
    )
    d.add_argument("--nodes", type=int, default=3, help="virtual nodes, one machine each (default 3)")
    d.add_argument(
        "--broker",
        default=None,
        help="use this broker (mqtt://host:port) instead of the embedded one",
    )
    d.add_argument("--json", type=Path, default=None, help="also write the JSON summary to this file")
    d.add_argument("--window-ms", type=int, default=500, help="window period on the nodes (default 500)")
    d.add_argument("--fault", default="bearing", choices=["bearing", "imbalance"], help="fault to switch on")
    d.add_argument("--fault-node", type=int, default=2, help="1-based node whose machine gets the fault")
    d.add_argument(
        "--fault-at",
        type=float,
        default=None,
        help="seconds after start (default: after calibration)",
    )
    d.add_argument("--opcua-port", type=int, default=0, help="OPC-UA port (default: a free one)")
    d.add_argument("--no-live", action="store_true", help="no live table")
    d.set_defaults(func=_demo)

    g = sub.add_parser("gateway", help="the gateway").add_subparsers(dest="gateway_cmd", required=True)
    gr = g.add_parser("run", help="run the gateway from a TOML config")
    gr.add_argument("--config", type=Path, required=True)
    gr.set_defaults(func=_gateway_run)

    n = sub.add_parser("node", help="sensor node tools").add_subparsers(dest="node_cmd", required=True)
    ns = n.add_parser("sim", help="run a virtual node (the firmware under the MicroPython unix port)")
    ns.add_argument(
        "--config",
        type=Path,
        required=True,
        help="node config JSON (see firmware/config.example.json)",
    )
    ns.add_argument(
        "--heapsize",
        default=None,
        help="MicroPython heap, e.g. 128k, to hold the node to an MCU's RAM",
    )
    ns.set_defaults(func=_node_sim)

    from edgeline.hil.bench_node import add_node_bench
    from edgeline.hil.deploy import add_parser as add_deploy_parser
    from edgeline.host.bench_gateway import add_gateway_bench
    from edgeline.host.opcua_security import add_parser as add_opcua_parser
    from edgeline.host.provision import add_parser as add_provision_parser
    from edgeline.quantize.bench import add_node_model_bench
    from edgeline.quantize.cli import add_quantize_parser

    add_deploy_parser(n)
    add_provision_parser(sub)
    add_opcua_parser(sub)
    add_quantize_parser(sub)
    bench = sub.add_parser("bench", help="benchmarks: JSON out, baselines measured in the same run")
    bench_sub = bench.add_subparsers(dest="bench_what", required=True)
    add_node_model_bench(bench_sub)
    add_gateway_bench(bench_sub)
    add_node_bench(bench_sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # asyncua and amqtt warn about things the demo already states (security None) or that
    # are theirs to fix; show them from -v on.
    noisy_level = {0: logging.ERROR, 1: logging.WARNING}.get(args.verbose, logging.INFO)
    for noisy in ("asyncua", "asyncuagds", "amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(noisy_level)
    with contextlib.suppress(KeyboardInterrupt):
        return int(args.func(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
