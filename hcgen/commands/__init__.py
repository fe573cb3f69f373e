"""One module per `hcgen` subcommand; each exposes `add_parser(subparsers)` that sets `func`."""
