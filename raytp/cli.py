"""The ``raytp`` command line: ``raytp demo``, ``raytp bench``."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raytp", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a TP MLP on the digits set through TPCluster")
    demo.add_argument("--tp", type=int, default=2)
    demo.add_argument("--epochs", type=int, default=15)
    demo.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    demo.add_argument("--no-progress", action="store_true")
    bench = commands.add_parser("bench", help="benchmarks")
    modes = bench.add_subparsers(dest="mode", required=True)
    control = modes.add_parser("control-plane",
                               help="driver-coordinated steps against the same steps looped in the actors")
    control.add_argument("--tp", type=int, default=2)
    control.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    control.add_argument("--tokens", type=int, default=512)
    control.add_argument("--steps", type=int, default=30)
    control.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    control.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        from raytp.driver.demo import main as demo_main

        accuracy = demo_main(tp=args.tp, epochs=args.epochs, device=args.device,
                             progress=not args.no_progress)
        return 0 if accuracy >= 0.95 else 1
    if args.command == "bench" and args.mode == "control-plane":
        from raytp.driver.overhead import main as control_main

        control_main(tp=args.tp, sizes=tuple(args.sizes), tokens=args.tokens, steps=args.steps,
                     device=args.device, json_path=args.json)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
