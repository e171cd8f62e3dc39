"""Checks on text that ends up in a shell script, a command line or a one-line record."""

from __future__ import annotations

import unicodedata

__all__ = ["control_character"]


def control_character(text: str) -> str | None:
    """The first control or line-breaking character in ``text``, described (``"U+000A"``), else None.

    A newline in a value rendered into a script line (an ``#SBATCH`` option, an ``export``) starts a
    new line that the shell runs; quoting does not help inside a comment line. Categories Cc (C0/C1
    controls, tab, DEL), Zl and Zp (Unicode line and paragraph separators) are refused everywhere.
    """
    for char in text:
        if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            return f"U+{ord(char):04X}"
    return None
