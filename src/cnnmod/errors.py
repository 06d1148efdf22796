"""The one exception type for mistakes a user can make.

The command line turns a :class:`UserError` into one line on stderr and exit status 2; the library raises
it wherever the fix is in the user's hands (a path, a name, a file), never for a bug of ours.

A message names a setting the user can change as ``«name»``, the name the library's own calls and configs use
(``«step»``: ``SlimSettings(step=...)``). Read from the library, ``str(error)`` says ``step``; the command line
says its own words instead (``step (--set step=...)``, ``--size``: :meth:`UserError.for_command_line`), so that
each reader is told what it can type.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_NAMED = re.compile(r"«(\w+)»")


class UserError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return _NAMED.sub(lambda m: m.group(1), self.message)

    def for_command_line(self, flags: dict[str, str] | Callable[[str], str]) -> str:
        """The message with every named setting as the command line's word for it: ``flags(name)`` or
        ``flags[name]``, else ``--name`` with dashes for underscores."""
        word = flags if callable(flags) else lambda n: flags.get(n, "--" + n.replace("_", "-"))
        return _NAMED.sub(lambda m: word(m.group(1)), self.message)
