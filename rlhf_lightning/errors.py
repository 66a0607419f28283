"""User-facing errors: a mistake in a config, a data file or a command line, as opposed to a bug.

The CLI prints a :class:`UserError` as one line naming the file, key or option and the fix, and exits with status 2;
any other exception keeps its full traceback. ``RLHF_VERBOSE=1`` (or ``--verbose``) shows tracebacks for user
errors too. Raise these as early as possible: before a model loads or DeepSpeed starts.

Each class also derives from the built-in exception a caller would expect (``ValueError``, ``FileNotFoundError``),
so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import os


class UserError(Exception):
    """Base of every error the user can fix; its message is the whole report."""


class ConfigError(UserError, ValueError):
    """An option has a wrong value, or options that cannot go together."""


class DataError(UserError, ValueError):
    """A data file or dataset is missing columns, malformed, or has no usable rows."""


class MissingPathError(UserError, FileNotFoundError):
    """A path named by an option does not exist (or lacks what it must hold, e.g. model weights)."""


def verbose() -> bool:
    """Full tracebacks and parser messages for user errors too (``RLHF_VERBOSE=1`` or ``--verbose``)."""
    return os.environ.get("RLHF_VERBOSE", "") not in ("", "0")
