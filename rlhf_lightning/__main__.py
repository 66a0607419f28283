"""Entry point: ``python -m rlhf_lightning fit --config configs/tiny/sft.yaml`` (or the ``rlhf-lightning`` script).

``fit``/``validate``/``test``/``predict`` go to LightningCLI (:class:`~rlhf_lightning.cli.RLHFCLI`); the commands in
:data:`COMMANDS` (``chat``, ``evaluate``, ``rejection-sampling``) are plain programs with their own ``--help``.

A user mistake (:class:`~rlhf_lightning.errors.UserError`: a bad path, column, option or combination) ends the run
with one line, ``error: <message>``, on stderr and exit status 2; any other exception is a bug and keeps its full
traceback. ``--verbose`` (anywhere on the command line) or ``RLHF_VERBOSE=1`` shows tracebacks for user errors too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

from rlhf_lightning.errors import UserError, verbose

if TYPE_CHECKING:
    from rlhf_lightning.cli import RLHFCLI


def find_user_error(error: BaseException) -> UserError | None:
    """The :class:`UserError` behind ``error``: itself, or one it was raised from. jsonargparse re-raises an
    exception from a class's ``__init__`` as a ``ValueError`` about Union subtypes, chained to the original."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def take_verbose_flag(args: list[str]) -> list[str]:
    """``args`` without ``--verbose``; when it was there, set ``RLHF_VERBOSE=1`` (inherited by the ranks Lightning
    launches, which re-run this command line)."""
    if "--verbose" in args:
        os.environ["RLHF_VERBOSE"] = "1"
    return [arg for arg in args if arg != "--verbose"]


# Commands that are not Lightning subcommands: name -> module whose ``main(argv)`` runs it.
COMMANDS = {"chat": "rlhf_lightning.chat", "evaluate": "rlhf_lightning.evaluation",
            "rejection-sampling": "rlhf_lightning.rejection_sampling"}


@contextlib.contextmanager
def user_errors_as_one_line() -> Iterator[None]:
    """Turn a :class:`UserError` raised in the block (or behind another exception) into ``error: <message>`` on
    stderr and ``SystemExit(2)``; anything else, or any error with ``--verbose``, keeps its traceback."""
    try:
        yield
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None or verbose():
            raise
        print(f"error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None


def run_command(name: str, args: list[str]) -> None:
    """Run one of :data:`COMMANDS` with the same error convention as the Lightning subcommands."""
    import importlib

    with user_errors_as_one_line():
        importlib.import_module(COMMANDS[name]).main(args)


def main(args: list[str] | None = None) -> RLHFCLI | None:
    """Run the CLI; ``args`` replaces ``sys.argv[1:]`` so tests can call it in-process. A user error raises
    ``SystemExit(2)`` after printing its one-line message."""
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in COMMANDS:
        return run_command(argv[0], take_verbose_flag(argv[1:]))
    from rlhf_lightning.cli import RLHFCLI, nested_nulls_as_dicts  # here: the other commands skip Lightning's import
    from rlhf_lightning.strategies import destroy_distributed

    if args is None:  # LightningCLI reads sys.argv itself (and warns when given both)
        sys.argv[1:] = nested_nulls_as_dicts(take_verbose_flag(sys.argv[1:]))
    else:
        args = nested_nulls_as_dicts(take_verbose_flag(args))
    try:
        with user_errors_as_one_line():
            return RLHFCLI(args=args)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    main()
