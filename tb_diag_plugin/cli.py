"""`tb-diag`: demo runs, findings report and export from the command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

from tb_diag_plugin import metadata


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tb-diag", description="TensorBoard Diagnostics: why training goes wrong.")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train small CPU models, healthy and broken, into LOGDIR")
    demo.add_argument("--logdir", default="runs", help="where to write the runs (default: runs)")
    demo.add_argument("--steps", type=int, default=400, help="training steps per run (default: 400)")

    report = sub.add_parser("report", help="findings for every run in LOGDIR")
    report.add_argument("logdir")
    report.add_argument("--json", action="store_true", help="a JSON list of findings")
    report.add_argument(
        "--fail-on", choices=metadata.SEVERITIES[::-1], default=None,
        help="exit with status 1 when a finding at or above this severity exists",
    )

    export = sub.add_parser("export", help="every recorded value as rows run,metric,layer,step,value")
    export.add_argument("logdir")
    export.add_argument("--run", default=None, help="only this run")
    export.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `tb-diag`; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except BrokenPipeError:
        # `tb-diag report runs | head`: the reader left; say nothing more.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep interpreter shutdown quiet
        except OSError:
            pass
        return 0


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        if args.steps < 1:
            print("tb-diag demo: --steps must be >= 1", file=sys.stderr)
            return 2
        from tb_diag_logger import demo  # torch: imported only when a demo is asked for

        t0 = time.perf_counter()
        print(f"tb-diag demo: training {len(demo.RUNS)} small models on the CPU")
        demo.write_demo(args.logdir, steps=args.steps)
        print(f"wrote {len(demo.RUNS)} runs to {os.path.abspath(args.logdir)} in {time.perf_counter() - t0:.1f} s")
        print("view them with:")
        print(f"  tensorboard --logdir {args.logdir}")
        print("and open the Diagnostics tab; or: tb-diag report " + args.logdir)
        return 0
    if not os.path.isdir(args.logdir):
        print(f"tb-diag {args.command}: no such directory: {args.logdir}", file=sys.stderr)
        return 2
    if args.command == "report":
        from tb_diag_plugin import report

        return report.run(args.logdir, args.json, args.fail_on, sys.stdout)
    from tb_diag_plugin import export

    return export.export(args.logdir, args.run, args.format, sys.stdout)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
