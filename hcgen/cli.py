"""The `hcgen` command: parse, call the library, print. Subcommands live in hcgen/commands/."""
from __future__ import annotations

import argparse
import sys

from hcgen.commands import data_cmd, demo_cmd, doctor, generate_cmd, pass_cmd, table1_cmd, train_cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hcgen",
        description="Adversarial diversity and hard positive generation (Rozsa et al., CVPRW 2016) on Caffe.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (demo_cmd, doctor, data_cmd, pass_cmd, generate_cmd, train_cmd, table1_cmd):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"hcgen {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nhcgen {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
