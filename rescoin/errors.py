"""The one error base class: a problem the operator can fix, said in one line.

Every room raises a subclass of ``RescoinError``; only the CLI prints it
(``rescoin: error: <message>``) and exits with its ``exit_code``. Nothing
below the CLI prints an error or chooses an exit status.
"""
from __future__ import annotations


class RescoinError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits with ``exit_code``."""

    exit_code: int = 2


class UserError(RescoinError):
    """A bad command line or a missing file, found by the CLI itself."""


__all__ = ["RescoinError", "UserError"]
