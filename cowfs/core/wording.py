"""How the commands count things in what they print: "1 entry", "2 entries", never "1 entries"."""

from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and the noun in the number it takes: ``counted(1, "change")`` is "1 change";
    ``plural``: where adding "s" is wrong (``counted(2, "entry", "entries")``)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
