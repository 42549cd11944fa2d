"""
Sizes and durations as operators write them, and back.

Sizes take k/m/g/t/p with an optional C{b} (or C{ib}), any case, as binary
multiples: C{100gb} is 100 * 2**30 bytes; a bare number is bytes.  Durations
take s/m/h/d (and w), alone or chained (C{1h30m}); a bare number is seconds.
Parsing raises L{ValueError} with a message meant for the operator; the
config loader adds the file and line.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_SIZE_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.I)
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)", re.I)


def parse_size(text: str) -> int:
    """
    Parse a size such as C{100gb}, C{1t}, C{1.5T}, C{512k} or C{4096} into
    bytes (binary multiples).  Fractions are allowed when they come out to
    whole bytes after rounding down.
    """
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(
            f"bad size {text!r}: expected a number with an optional unit "
            "k, m, g, t or p (e.g. 100gb, 1t, 512m)"
        )
    number, unit = match.groups()
    try:
        value = Decimal(number) * (1024 ** _SIZE_UNITS[unit.lower()])
    except InvalidOperation:  # pragma: no cover - the regex admits only digits
        raise ValueError(f"bad size {text!r}")
    return int(value)


def parse_duration(text: str) -> float:
    """
    Parse a duration such as C{30d}, C{90s}, C{1h30m} or C{60} (seconds)
    into seconds.
    """
    stripped = text.strip()
    if not stripped:
        raise ValueError("bad duration '': expected e.g. 60s, 5m, 1h, 30d")
    total = Decimal(0)
    position = 0
    for match in _DURATION_PART.finditer(stripped):
        if match.start() != position or not match.group(0):
            break
        number, unit = match.groups()
        total += Decimal(number) * _DURATION_UNITS[(unit or "s").lower()]
        position = match.end()
        while position < len(stripped) and stripped[position] == " ":
            position += 1
    if position != len(stripped):
        raise ValueError(
            f"bad duration {text!r}: expected a number with an optional unit "
            "s, m, h, d or w (e.g. 60s, 5m, 1h30m, 30d)"
        )
    return float(total)


def format_size(size: int) -> str:
    """
    Write a byte count in the shortest exact form C{parse_size} reads back:
    C{107374182400} becomes C{100g}; a count that is no whole multiple of
    1024 stays in bytes.
    """
    for unit in "ptgmk":
        scale = 1024 ** _SIZE_UNITS[unit]
        if size and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def format_duration(seconds: float) -> str:
    """
    Write seconds in the shortest exact form C{parse_duration} reads back:
    C{2592000} becomes C{30d}.
    """
    if seconds != int(seconds):
        return f"{seconds!r}s"
    whole = int(seconds)
    for unit in "wdhm":
        scale = _DURATION_UNITS[unit]
        if whole and whole % scale == 0:
            return f"{whole // scale}{unit}"
    return f"{whole}s"


def human_size(size: int) -> str:
    """A short, rounded size for people: C{3.2G}, C{100G}, C{512B}."""
    value = float(size)
    for unit in ("B", "K", "M", "G", "T"):
        if abs(value) < 1024 or unit == "T":
            break
        value /= 1024
    if unit == "B":
        return f"{size}B"
    text = f"{value:.1f}"
    if text.endswith(".0"):
        text = text[:-2]
    return f"{text}{unit}"
