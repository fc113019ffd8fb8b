"""The ``sqsd`` command: ``report`` (plots and tables from a run), with ``score``, ``directions`` and ``demo``."""

from __future__ import annotations

import argparse
import sys


def _report(opts) -> None:
    from .report import write_report
    path = write_report(opts.run_dir, opts.out, top_k=opts.top_k)
    print(f"report: {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sqsd", description="SQSD safety-degradation scores for fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("report", help="plots and a Markdown summary from a run's sqsd/ folder")
    p.add_argument("run_dir", help="the run's output_dir (or its sqsd/ folder)")
    p.add_argument("--out", default=None, help="where to write (default: <run>/sqsd/report)")
    p.add_argument("--top-k", type=int, default=20, help="how many riskiest examples to list")
    p.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    try:
        opts.func(opts)
    except (FileNotFoundError, ValueError) as e:
        print(f"sqsd {opts.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
