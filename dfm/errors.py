"""The one base class of errors a user can fix (a bad config key, a missing file, a corrupt checkpoint, bad input),
the errors shared by several modules, and `first_line`, the one way an exception becomes a one-line message.

`dfm` commands print such an error as one line on stderr and exit with code 2, no traceback. Library code raises a
subclass with a message that names the problem and the fix."""

from __future__ import annotations


class UserError(Exception):
    """An error caused by input the user controls; its message says what is wrong and how to fix it."""


class CheckpointError(UserError, RuntimeError, ValueError):
    """A missing, unreadable or mismatched checkpoint (a training step_* folder or model weights); the message
    names the path and what to do. A RuntimeError and a ValueError too, so `except` clauses written for either of
    the two classes it replaces (dfm.checkpoint's and dfm.models.wan's) still catch it."""


def first_line(e: BaseException, empty: str | None = None) -> str:
    """The first line of `str(e)`, for one-line messages; for an empty message `empty`, or the type name when
    `empty` is None. (A message that starts with a newline gives "", as `str(e).splitlines()[0]` does.)"""
    lines = str(e).splitlines()
    if lines:
        return lines[0]
    return type(e).__name__ if empty is None else empty
