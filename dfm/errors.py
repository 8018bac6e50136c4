"""The one base class of errors a user can fix (a bad config key, a missing file, a corrupt checkpoint, bad input).

`dfm` commands print such an error as one line on stderr and exit with code 2, no traceback. Library code raises a
subclass with a message that names the problem and the fix."""


class UserError(Exception):
    """An error caused by input the user controls; its message says what is wrong and how to fix it."""
