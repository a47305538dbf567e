"""What every command line shares: a bad input ends in one sentence on stderr and exit code 2."""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

from .errors import UserError


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C but ending with its own exit status (128 + 15)."""


def whole(low: int, high: int | None = None):
    """An argparse type: a whole number from ``low`` (to ``high``)."""
    def number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"of {low} or more"
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number {bounds}")
        return value
    return number


def plural(n: int, noun: str, nouns: str = "") -> str:
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


class OneLineParser(argparse.ArgumentParser):
    """argparse whose command-line errors are a ``UserError`` (one sentence, no usage block)."""

    def error(self, message: str):
        raise UserError(f"{message}; see {self.prog} --help")


def command(main: Callable[[list[str] | None], int | None] | None = None, *, interrupted: str = "interrupted"):
    """Wraps a command's ``main(argv)``: a ``UserError`` becomes ``error: ...`` on stderr and exit code 2, Ctrl-C
    the line ``interrupted`` (what is kept and how to go on) and exit code 130 (143 for ``Terminated``). ``@command`` or
    ``@command(interrupted=...)``."""
    if main is None:
        return functools.partial(command, interrupted=interrupted)

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        logging.basicConfig(format="warning: %(message)s", level=logging.WARNING)  # as the commands' own warnings
        try:
            return main(argv) or 0
        except UserError as e:  # a file name that is not UTF-8 shows its bytes (caf\xe9)
            said = str(e).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            print(f"error: {said}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            print(interrupted, file=sys.stderr)
            return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
        except BrokenPipeError:  # the reader stopped early (| head): stop quietly, as the shell's own tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the exit's flush cannot fail
            return 1

    return run


def finish(code: int | None) -> NoReturn:
    """Ends a command's process with ``code``. The garbage is collected first (finalizers run, files flush), then the
    objects still alive are frozen out of the collector, so that the interpreter's exit leaves them to the operating
    system instead of collecting them one by one: over a second with torch loaded, most of a short command's time
    after its work."""
    gc.collect()
    gc.freeze()
    sys.exit(code)
