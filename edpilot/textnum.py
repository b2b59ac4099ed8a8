"""Numbers in text that someone else wrote (pod annotations, a tenant's /metrics): ASCII only.

`str.isdigit()` is true for '²', which `int()` then refuses with an exception; `int()` and
`float()` also take Arabic-Indic or full-width digits and underscores. These parsers accept what
the Prometheus text format and Kubernetes mean by a number and answer None for anything else.
"""

from __future__ import annotations

import math
import re

# Long enough for any count a GPU workload has; short enough that parsing costs nothing.
_INT = re.compile(r"[0-9]{1,18}")
_FLOAT = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?")
# Go's strconv.ParseFloat (Prometheus' parser) spells the special values these ways.
_SPECIAL = {
    "nan": math.nan,
    "inf": math.inf,
    "+inf": math.inf,
    "-inf": -math.inf,
    "infinity": math.inf,
    "+infinity": math.inf,
    "-infinity": -math.inf,
}
MAX_FLOAT_TEXT = 64


def ascii_int(text: str) -> int | None:
    """A non-negative integer written in ASCII digits (surrounding blanks allowed), else None."""
    text = text.strip(" \t")
    return int(text) if _INT.fullmatch(text) else None


def positive_int(text: str | None, maximum: int = 2**31 - 1) -> int | None:
    """An integer in [1, maximum] written in ASCII digits, else None."""
    value = ascii_int(text) if text is not None else None
    return value if value is not None and 1 <= value <= maximum else None


def ascii_float(text: str) -> float | None:
    """A number as the Prometheus text format writes one (NaN and infinities included), else None."""
    if len(text) > MAX_FLOAT_TEXT:
        return None
    special = _SPECIAL.get(text.lower())
    if special is not None:
        return special
    return float(text) if _FLOAT.fullmatch(text) else None
