"""Expected bad input: one clear line on stderr and exit status 2 (README, "Commands").

``error_line`` is the one place that formats a line for stderr: every command's error and argparse's
usage errors go through it, so a value echoed in a message (a file name holding a newline, an id
from a hostile json) can never start a second, forged line.
"""

import argparse
import sys
import unicodedata
from typing import NoReturn

# Besides C0/C1 controls (Cc): line and paragraph separators, and the bidirectional overrides that
# reorder what a terminal shows. Lone surrogates (undecodable bytes in a file name) are escaped too.
_ESCAPED_CATEGORIES = {"Cc", "Zl", "Zp", "Cs"}
_BIDI_CONTROLS = {*map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A)), "\u200e", "\u200f"}
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


class UserError(Exception):
    """Bad input or usage the user can fix; the message names the file/key and the fix."""

    exit_code = 2


class TrainingDiverged(RuntimeError):
    """A NaN/inf loss stopped training (pretraining or fine-tuning); the CLI exits 1 with its message."""


def _escape_char(char: str) -> str:
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text) -> str:
    """``text`` with every control character, line separator and bidi override written as an escape
    (``\\n``, ``\\x1b``, ``\\u2028``): what it prints is always exactly one line."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(_escape_char(c) if c in _BIDI_CONTROLS or unicodedata.category(c) in _ESCAPED_CATEGORIES
                   else c for c in text)


def error_line(message, prefix: str = "error: ") -> str:
    """The one line printed for an error: ``prefix`` then the message, escaped to one line."""
    return prefix + escape_controls(message)


def print_error(message, prefix: str = "error: ") -> None:
    print(error_line(message, prefix), file=sys.stderr, flush=True)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse with a usage error as one ``error:`` line (the command and the ``--help`` hint) and exit
    status 2, instead of the usage block plus an error line; sub-parsers inherit the class."""

    def error(self, message) -> NoReturn:
        print_error(f"{self.prog}: {message} (see {self.prog} --help)")
        self.exit(2)
