"""The one exception type for mistakes a user can make.

The command line turns a :class:`UserError` into one line on stderr and exit status 2; the library raises
it wherever the fix is in the user's hands (a path, a name, a file), never for a bug of ours.
"""


class UserError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""
