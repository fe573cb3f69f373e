"""The `hcgen` command: parse, call the library, print. Subcommands live in hcgen/commands/."""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from hcgen import __version__
from hcgen.commands import (data_cmd, demo_cmd, doctor, export_cmd, generate_cmd, pass_cmd, report_cmd, table1_cmd,
                            train_cmd)
from hcgen.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hcgen",
        description="Adversarial diversity and hard positive generation (Rozsa et al., CVPRW 2016) on Caffe.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error (also HCGEN_DEBUG=1)")
    parser.add_argument("--version", action="version", version=f"hcgen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in (demo_cmd, doctor, data_cmd, pass_cmd, generate_cmd, train_cmd, table1_cmd, report_cmd,
                   export_cmd):
        module.add_parser(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user's input or environment causes: `hcgen.errors.UserError`, an OSError of the system (a
    missing file, a full disk, no permission), and the errors of damaged or foreign files raised by the
    readers hcgen uses (LMDB, OpenCV, protobuf, CSV, JSON). Any other exception is a bug in hcgen."""
    errors: list[type[BaseException]] = [UserError, OSError, json.JSONDecodeError, csv.Error]
    for module, name in (("lmdb", "Error"), ("cv2", "error"), ("google.protobuf.message", "Error")):
        if module in sys.modules:  # an error of a module never imported was never raised
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (OSError without its '[Errno N]', KeyError without quotes)."""
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    elif isinstance(exc, KeyError) and len(exc.args) == 1:
        text = str(exc.args[0])
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Run one command. Errors print one line, ``hcgen CMD: error: ...``, and exit 2 (1 for a bug);
    ``--debug`` (anywhere on the line) or ``HCGEN_DEBUG=1`` shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv[1:]:  # accepted after the command too
        argv.remove("--debug")
        argv.insert(0, "--debug")
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get("HCGEN_DEBUG", "") not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"\nhcgen {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        if isinstance(exc, _user_errors()):
            print(f"hcgen {args.command}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        print(f"hcgen {args.command}: error: internal error ({type(exc).__name__}: {_one_line(exc)}); "
              "rerun with --debug for the traceback and report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
