"""User mistakes on the command line. A command refuses what the user gave it (an argument, a file, a column, an
existing output) by raising a `UsageError` whose message names the problem and the fix; its entry point prints that
as one line, `<prog>: error: <message>`, and exits with status 2, as `argparse` does for an argument it does not know.
Any other exception is a bug and keeps its traceback.

A `UsageError` is a `ValueError` (an `OutputExistsError` also a `FileExistsError`), so code that calls the commands'
functions in-process catches them as before.
"""

import argparse
from collections.abc import Iterator
from contextlib import contextmanager


class UsageError(ValueError):
    """A mistake in what the user gave a command; the message names the problem and the fix."""


class OutputExistsError(UsageError, FileExistsError):
    """The output a command would write exists, and replacing it was not asked for."""


@contextmanager
def refusing_usage_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Turns a `UsageError` raised inside into `<parser.prog>: error: <message>` on stderr and exit status 2; lets
    every other exception through.

    Raises:
        SystemExit: with status 2, for a `UsageError`.
    """
    try:
        yield
    except UsageError as error:
        message = " ".join(str(error).splitlines())  # one line, whatever the message held
        parser.exit(2, f"{parser.prog}: error: {message}\n")


def parse_arguments(parser, argv: list[str] | None) -> tuple:
    """The dataclasses of an `HfArgumentParser` filled from `argv` (default: `sys.argv[1:]`).

    Raises:
        UsageError: for arguments the parser does not know (`HfArgumentParser` raises a bare `ValueError`), or what
            the dataclasses' `__post_init__` raise.
        SystemExit: for what `argparse` refuses itself (a missing required argument, a value of the wrong type), and
            after `--help`.
    """
    *arguments, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (see --help for the arguments).")
    return tuple(arguments)


__all__ = ["OutputExistsError", "UsageError", "parse_arguments", "refusing_usage_errors"]
