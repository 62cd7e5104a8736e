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

Ctrl-C (SIGINT) and SIGTERM (``timeout``, systemd, batch schedulers) end any command
with one line, ``asd-ray: interrupted (SIGINT): ...``, and status 130 or 143 (128 +
the signal): every clean-up runs first (temporary files removed, Ray and every
process the command started stopped), and for ``run`` the line says which epochs
the run folder keeps and how to continue. A second signal during that clean-up
ends the command at once with the same line (a run's Ray processes are then
stopped by its reaper, :mod:`asd_ray.reaper`; a temporary file being written may
then be left, hidden, beside its target). A reader that closes the pipe
early (``asd-ray audit summary RUN | head -1``) ends the command quietly with
status 141 (128 + SIGPIPE, what a shell reports for a writer the closed pipe killed).

Commands live by the data flow: :mod:`~asd_ray.cli.data` (shards, poison,
seeds), :mod:`~asd_ray.cli.run` (run, config, evaluate), :mod:`~asd_ray.cli.audit`
(audit, report).
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import threading
import traceback
from collections.abc import Sequence

from asd_ray import freed_memory

freed_memory.prepare_command(sys.argv[1:])  # before anything loads Arrow (see asd_ray.freed_memory)

from asd_ray import __version__, progress  # noqa: E402
from asd_ray.cli import audit, data, run  # noqa: E402
from asd_ray.cli.common import OneLineParser  # noqa: E402
from asd_ray.errors import StorageError, UserError  # noqa: E402

INTERRUPTS = (signal.SIGINT, signal.SIGTERM)
_BROKEN_PIPE_STATUS = 128 + signal.SIGPIPE


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
    received: list[int] = []  # the signals that came, first one first

    def interrupt(signum: int, frame) -> None:
        if received:  # a second signal while the first one's clean-up runs: stop now
            try:
                _interrupted_line(args, received[0])
            finally:
                os._exit(128 + received[0])
        received.append(signum)
        # A KeyboardInterrupt, so Ray's blocking calls give way to it as to Ctrl-C (they
        # re-raise a plain one: which signal it was is read from ``received``).
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = _install(dict.fromkeys(INTERRUPTS, interrupt))
    try:
        result = args.func(args)
        if result is not None:
            print(json.dumps(result, default=str))
        sys.stdout.flush()  # a closed pipe is found here, not in Python's flush at exit
    except KeyboardInterrupt:
        signum = received[0] if received else signal.SIGINT
        _interrupted_line(args, signum)
        return 128 + signum
    except BrokenPipeError:
        if not _stdout_reader_gone():
            return _bug()
        _discard_stdout()
        return _BROKEN_PIPE_STATUS
    except UserError as err:
        _error_line(err)
        return 2
    except StorageError as err:
        _error_line(err)
        return 1
    except Exception:  # not the user's mistake: keep everything a bug report needs
        return _bug()
    finally:
        _install(previous)
        progress.set_quiet(False)
    return 0


def _bug() -> int:
    """Print the exception being handled as a bug in asd-ray; its status."""
    print(progress.terminal_safe(traceback.format_exc(), keep_newlines=True), end="", file=sys.stderr)
    print(
        f"asd-ray: internal error: the traceback above is a bug in asd-ray {__version__}, "
        "not a problem with your input; please report it",
        file=sys.stderr,
    )
    return 1


def _install(handlers: dict) -> dict:
    """Install each signal's handler in the main thread; the handlers they replace. In another
    thread, where Python cannot handle signals, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, h) for signum, h in handlers.items() if h is not None}


def _interrupted_line(args, signum: int) -> None:
    """The one line of an interrupted command: for ``run``, what its folder keeps and how to go on."""
    name = signal.Signals(signum).name
    if getattr(args, "command", None) == "run":
        line = f"asd-ray: interrupted ({name}): {_kept(args)}"
    else:
        line = f"asd-ray: interrupted ({name}); nothing half-written is left: run the command again"
    print(progress.terminal_safe(line), file=sys.stderr, flush=True)


def _kept(args) -> str:
    """What an interrupted run left in its ``--out`` (a folder, or a run published to a
    bucket, reached with the command's storage settings) and the command that continues it."""
    from asd_ray import storage
    from asd_ray.cli.run import command_storage
    from asd_ray.run_folder import CONFIG_FILE, read_metrics

    out = args.out
    try:
        where = storage.location(out, command_storage(args))
        if not storage.is_file(where / CONFIG_FILE):
            return "the run had not started, nothing was kept; start it again with the same command"
        epochs = read_metrics(where).column("epoch").to_pylist()
    except (UserError, StorageError, OSError):  # no epoch finished yet (or the folder cannot be read)
        epochs = []
    if not epochs:
        kept = f"{out} has no finished epoch yet"
    else:
        kept = f"{out} keeps epoch 0" if max(epochs) == 0 else f"{out} keeps epochs 0 to {max(epochs)}"
    return f"{kept}; continue with asd-ray run --resume {out}"


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (a broken pipe elsewhere is a bug)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)  # POLLERR is reported whatever the mask
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):  # stdout is closed, or not a file
        return False


def _discard_stdout() -> None:
    """After a closed pipe: send what is left of stdout to /dev/null, so that Python's final
    flush at exit finds no pipe to fail on."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _error_line(err: BaseException) -> None:
    print(f"asd-ray: error: {progress.terminal_safe(str(err))}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
