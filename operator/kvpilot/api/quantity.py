"""Kubernetes resource quantities ("80Gi", "1.5G", 4096) as exact byte counts."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_SUFFIXES = {
    "": 1,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}
# The same grammar the API server accepts for a non-negative quantity, minus milli-units
# (a fraction of a byte is meaningless here). Kept in one place: the CRD schema uses it.
QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"
_QUANTITY = re.compile(QUANTITY_PATTERN)

GiB = 2**30
MiB = 2**20


def parse_bytes(value: int | str) -> int:
    """Parse a byte quantity; fractional results round up (a budget never under-counts)."""
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"quantity must not be negative: {value}")
        return value
    text = str(value).strip()
    match = _QUANTITY.match(text)
    if not match:
        raise ValueError(
            f"not a byte quantity: {value!r} (use e.g. 16Gi, 500Mi, 8G or a plain integer)"
        )
    number, _, suffix = match.group(1), match.group(2), match.group(3) or ""
    try:
        amount = Decimal(number)
    except InvalidOperation as err:  # pragma: no cover - the regex admits only decimals
        raise ValueError(f"not a byte quantity: {value!r}") from err
    if suffix[:1] in ("e", "E"):
        amount *= Decimal(10) ** int(suffix[1:])
    else:
        amount *= _SUFFIXES[suffix]
    whole = int(amount)
    return whole if whole == amount else whole + 1


def format_bytes(n: float) -> str:
    """Human-readable binary size with one decimal: 65755949056 -> '61.2 GiB'."""
    for unit, size in (("TiB", 2**40), ("GiB", GiB), ("MiB", MiB), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
