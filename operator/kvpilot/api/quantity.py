"""Kubernetes resource quantities ("80Gi", "1.5G", 4096) as exact numbers.

Both grammars here are the API server's, bounded: at most 20 digits before and after
the point and a two-digit exponent. So parsing costs the same for every accepted text
(no ``1e999999`` that takes seconds or overflows a float), and the CRD schema uses the
same patterns, so the API server refuses what this module refuses.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_SUFFIXES: dict[str, Fraction] = {
    "": Fraction(1), "n": Fraction(1, 10**9), "u": Fraction(1, 10**6),
    "m": Fraction(1, 10**3),
    **{k: Fraction(v) for k, v in _BINARY.items()},
    **{k: Fraction(v) for k, v in _DECIMAL.items()},
}
_NUMBER = r"([0-9]{1,20}(\.[0-9]{0,20})?|\.[0-9]{1,20})"
# A non-negative byte count, minus milli-units (a fraction of a byte is meaningless).
QUANTITY_PATTERN = rf"^{_NUMBER}([eE][0-9]{{1,2}}|Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"
# A non-negative container resource quantity ("500m" CPU, "4Gi" memory, "1e-3").
RESOURCE_QUANTITY_PATTERN = (
    rf"^{_NUMBER}([eE][+-]?[0-9]{{1,2}}|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$"
)
_QUANTITY = re.compile(QUANTITY_PATTERN)
_RESOURCE_QUANTITY = re.compile(RESOURCE_QUANTITY_PATTERN)

GiB = 2**30
MiB = 2**20
# The largest byte count any kvpilot quantity may hold: above any GPU's HBM, any model's
# weights, and far below where a count stops being exact in the API server or a float.
MAX_BYTES = 2**50
MAX_BYTES_TEXT = "1Pi"
BYTES_HINT = "an integer or a quantity such as 16Gi, 500Mi or 8G, at most 1Pi"


def _exact(match: re.Match[str]) -> Fraction:
    number, suffix = match.group(1), match.group(3) or ""
    whole, _, frac = number.partition(".")
    amount = Fraction(int(whole or "0") * 10 ** len(frac) + int(frac or "0"), 10 ** len(frac))
    if suffix in _SUFFIXES:  # "E" is exa, "Ei" exbi; "E3" or "e-3" an exponent
        return amount * _SUFFIXES[suffix]
    return amount * Fraction(10) ** int(suffix[1:])


def parse_quantity(value: int | str) -> Fraction:
    """A non-negative resource quantity, exactly ("500m" -> 1/2)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, int):
        if not 0 <= value <= 2**63 - 1:
            raise ValueError(f"quantity must be from 0 to 2^63-1: {value}")
        return Fraction(value)
    match = _RESOURCE_QUANTITY.fullmatch(value)
    if not match:
        raise ValueError(f"not a quantity: {value!r} (use e.g. 500m, 2, 4Gi or 1e3)")
    return _exact(match)


def parse_bytes(value: int | str) -> int:
    """Parse a byte quantity of at most :data:`MAX_BYTES`; fractions round up (a budget
    never under-counts)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"not a byte quantity: {value!r} (use {BYTES_HINT})")
    if isinstance(value, int):
        amount = Fraction(value)
    else:
        match = _QUANTITY.fullmatch(value)
        if not match:
            raise ValueError(f"not a byte quantity: {value!r} (use {BYTES_HINT})")
        amount = _exact(match)
    if amount < 0:
        raise ValueError(f"a byte quantity must not be negative: {value}")
    if amount > MAX_BYTES:
        raise ValueError(f"a byte quantity must be at most {MAX_BYTES_TEXT}: {value}")
    return -(-amount.numerator // amount.denominator)


def format_bytes(n: float) -> str:
    """Human-readable binary size with one decimal: 65755949056 -> '61.2 GiB'."""
    for unit, size in (("EiB", 2**60), ("PiB", 2**50), ("TiB", 2**40), ("GiB", GiB),
                       ("MiB", MiB), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
