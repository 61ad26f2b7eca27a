"""`sdray generate | sweep | serve | bench`: thin wrappers over the library functions."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import NoReturn

from sdray.errors import SdrayError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    parser.add_argument("--config", help="YAML config file (default: the embedded CPU config)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override one config value, e.g. --set generation.steps=30 (repeatable)",
    )


def _add_run_mode_args(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="skip rows already committed")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdray", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on failure")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="run an offline generation job")
    generate.add_argument("--input", required=True, help="prompt table: Parquet/CSV/JSONL URI")
    generate.add_argument("--output", required=True, help="output directory URI")
    _add_config_args(generate)
    _add_run_mode_args(generate)
    generate.add_argument("--no-progress", action="store_true", help="hide progress bars")

    sweep = commands.add_parser("sweep", help="expand a sweep spec and generate it")
    sweep.add_argument("spec", help="sweep spec YAML")
    sweep.add_argument("--output", required=True, help="output directory URI")
    _add_config_args(sweep)
    _add_run_mode_args(sweep)
    sweep.add_argument("--no-progress", action="store_true", help="hide progress bars")

    serve = commands.add_parser("serve", help="serve the engine over HTTP with Ray Serve")
    _add_config_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)

    bench = commands.add_parser("bench", help="compare a plain diffusers loop, the engine and Ray")
    _add_config_args(bench)
    bench.add_argument("--rows", type=int, default=256, help="images per measured run")
    bench.add_argument("--skip-ray", action="store_true", help="measure in-process only")
    bench.add_argument(
        "--no-scaling", action="store_true", help="skip the one-actor run (multi-actor scaling)"
    )
    bench.add_argument(
        "--suite",
        choices=["pipeline", "gpu", "device"],
        default="pipeline",
        help="pipeline: diffusers loop vs engine vs Ray Data (default); gpu: the speed levers "
        "at real model sizes (SD 1.5, SDXL) on cuda, tiny models on cpu; device: the batch "
        "pipeline's device busy fraction with stand-in GPUs (any machine)",
    )
    bench.add_argument(
        "--out", default=None, help="--suite gpu: output directory; device: JSON file"
    )
    bench.add_argument(
        "--shapes",
        default="sd15,sdxl",
        help="--suite device: stand-in device shapes, comma-separated: sd15 (512², 8 per "
        "1.2 s), sdxl (1024², 2 per 1.35 s) or SIZE:BATCH:SECONDS",
    )
    bench.add_argument(
        "--device-seconds",
        type=float,
        default=600.0,
        help="--suite device: seconds of device work per shape, over all actors",
    )
    bench.add_argument(
        "--actors", type=int, default=2, help="--suite device: model actors (stand-in GPUs)"
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="--suite gpu: only the Ray Data pipeline against the plain loop (SD 1.5 and SDXL)",
    )
    return parser


def _generate(args) -> int:
    from sdray.batch import run_generate
    from sdray.config import load_config

    config = load_config(args.config, args.overrides)
    summary = run_generate(
        args.input,
        args.output,
        config,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=not args.no_progress,
    )
    print(summary.line())
    return 0


def _sweep(args) -> int:
    from sdray.config import load_config
    from sdray.sweep import run_sweep

    config = load_config(args.config, args.overrides)
    summary = run_sweep(
        args.spec,
        args.output,
        config,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=not args.no_progress,
    )
    print(summary.line())
    return 0


def _serve(args) -> int:
    from sdray.config import load_config
    from sdray.serve import run_server

    config = load_config(args.config, args.overrides)
    run_server(config, host=args.host, port=args.port)
    return 0


def _bench(args) -> int:
    from sdray.config import load_config
    from sdray.tools.bench import run_bench

    if args.suite == "gpu":
        from sdray.tools.bench_levers import run_suite, summary_table

        results = run_suite(args.out or "bench-gpu", ray=not args.skip_ray, quick=args.quick)
        print(summary_table(results))
        return 0
    if args.suite == "device":
        from sdray.tools.bench_device import run_suite as run_device_suite

        run_device_suite(
            args.shapes.split(","),
            device_seconds=args.device_seconds,
            actors=args.actors,
            overrides=args.overrides,
            out=args.out,
        )
        return 0
    config = load_config(args.config, args.overrides)
    run_bench(config, rows=args.rows, include_ray=not args.skip_ray, scaling=not args.no_scaling)
    return 0


COMMANDS = {"generate": _generate, "sweep": _sweep, "serve": _serve, "bench": _bench}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("sdray: interrupted", file=sys.stderr)
        return 130
    except SdrayError as error:
        if args.debug:
            traceback.print_exc()
        print(f"sdray {args.command}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - one paragraph for the user; --debug for the rest
        if args.debug:
            traceback.print_exc()
        print(
            f"sdray {args.command}: failed: {type(error).__name__}: {error}\n"
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


# How long a finished command waits for Ray's shutdown (a driver disconnecting from its
# cluster) before it ends without it: its results are committed already.
SHUTDOWN_WAIT_S = 20.0


def exit_process(code: int) -> NoReturn:
    """End this process with `code` within seconds of its command finishing.

    A driver's exit runs `ray.shutdown()` (Ray's atexit hook) and joins every non-daemon
    thread; either can block on a peer that is gone — a node killed outright, whose raylet the
    driver's core worker still waits on — and a process that never exits is a `ray job` that
    never ends (`ray job submit`, and a KubeRay RayJob, wait on it forever). So the process
    shuts Ray down itself, waits for that at most SHUTDOWN_WAIT_S, flushes its output and
    exits without running anything else. Only for the process's entry points (the `sdray`
    command, pipelines/), never for `main` called as a library.
    """
    import os
    import threading

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        shut = threading.Thread(target=ray.shutdown, name="sdray-ray-shutdown", daemon=True)
        shut.start()
        shut.join(SHUTDOWN_WAIT_S)
        if shut.is_alive():
            print(
                f"sdray: Ray's shutdown did not finish in {SHUTDOWN_WAIT_S:.0f}s; exiting "
                "without it",
                file=sys.stderr,
            )
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to say
            pass
    os._exit(code)


def run(argv: list[str] | None = None) -> NoReturn:
    """The `sdray` command and pipelines/ scripts: `main`, then `exit_process`."""
    exit_process(main(argv))


if __name__ == "__main__":
    run()
