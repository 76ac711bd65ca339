"""What every command shares about bad input: the error that exits 2 and the parser that reports it.

A leaf module, so that the command modules and `bridge.cli` (which registers them) can both
import it without importing each other.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = ["PROG", "Parser", "UsageError"]

PROG = "callbridge"


class UsageError(Exception):
    """Bad input from the user: exit code 2, one line."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")
