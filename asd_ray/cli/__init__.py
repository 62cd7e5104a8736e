"""``asd-ray`` command line: each command maps flags to one library call.

stdout carries only the command's final JSON line (so ``asd-ray ... | jq``
works); progress bars and human lines go to stderr, and ``--quiet`` drops them.
``asd-ray audit`` and ``config show`` print their product (a table, YAML) on
stdout instead, and JSON with ``--json``. Bad input or a bad setting (a
:class:`~asd_ray.errors.UserError`) exits with status 2 and a one-line error
that names the problem and the fix; a run whose disk fills up exits with status
1 and one line. Any other exception is a bug in asd-ray: status 1 with its
traceback, never blamed on the input. Nothing half-written is left behind, and
text from the data (names, keys, paths) reaches the terminal with its control
characters escaped.

Commands live by the data flow: :mod:`~asd_ray.cli.data` (shards, poison,
seeds), :mod:`~asd_ray.cli.run` (run, config, evaluate), :mod:`~asd_ray.cli.audit`
(audit, report).
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Sequence

from asd_ray import __version__, progress
from asd_ray.cli import audit, data, run
from asd_ray.cli.common import OneLineParser
from asd_ray.errors import StorageError, UserError


def build_parser() -> OneLineParser:
    """The full ``asd-ray`` argument parser."""
    parser = OneLineParser(
        prog="asd-ray",
        description="ASD backdoor defense on Ray: make shards, poison them, pick seeds, run, audit.",
    )
    parser.add_argument("--version", action="version", version=f"asd-ray {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    data.add_commands(commands)
    run.add_commands(commands)
    audit.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``asd-ray`` console script."""
    args = build_parser().parse_args(argv)
    progress.set_quiet(getattr(args, "quiet", False))
    try:
        result = args.func(args)
    except UserError as err:
        _error_line(err)
        return 2
    except StorageError as err:
        _error_line(err)
        return 1
    except Exception:  # not the user's mistake: keep everything a bug report needs
        print(progress.terminal_safe(traceback.format_exc(), keep_newlines=True), end="", file=sys.stderr)
        print(
            f"asd-ray: internal error: the traceback above is a bug in asd-ray {__version__}, "
            "not a problem with your input; please report it",
            file=sys.stderr,
        )
        return 1
    finally:
        progress.set_quiet(False)
    if result is not None:
        print(json.dumps(result, default=str))
    return 0


def _error_line(err: BaseException) -> None:
    print(f"asd-ray: error: {progress.terminal_safe(str(err))}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
