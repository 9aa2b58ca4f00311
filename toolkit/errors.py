"""The one exception type for mistakes a user can fix (bad file, bad config field, unknown task)."""

import sys
from contextlib import contextmanager
from typing import Iterator


class ToolkitError(Exception):
    """A user-facing error: the message names the file, key or config field and what to do.

    Entry points print only the message (no traceback) and exit non-zero.
    """


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """In a command-line entry point: print a ToolkitError's message alone and exit with status 2."""
    try:
        yield
    except Exception as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, ToolkitError):
            cause = cause.__cause__  # Hydra's instantiate wraps what a constructor raised
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)
