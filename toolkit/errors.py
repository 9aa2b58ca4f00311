"""The one exception type for mistakes a user can fix (bad file, bad config field, unknown task)."""


class ToolkitError(Exception):
    """A user-facing error: the message names the file, key or config field and what to do.

    Entry points print only the message (no traceback) and exit non-zero.
    """
