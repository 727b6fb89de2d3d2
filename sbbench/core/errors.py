"""The error a bad argument raises anywhere in the library.

The library names the argument or settings field at fault (``seqlens``, ``storage``, ``out_dir``)
and never a command-line flag: the CLI (``sbbench/cli/``) maps ``argument`` to its own flag, so
one message serves a Python caller and a shell user alike.
"""

from __future__ import annotations


class ArgumentError(ValueError):
    """A bad value of ``argument`` (a parameter or settings field); ``str()`` is
    ``"<argument>: <message>"``, what a Python caller sees."""

    def __init__(self, argument: str, message: str) -> None:
        super().__init__(f"{argument}: {message}")
        self.argument = argument
        self.message = message
