"""Optional API keys: ``Authorization: Bearer KEY`` checked against a file of keys.

The file (a Secret mounted as a volume, in the chart) holds one key per line; blank
lines and lines starting with ``#`` are skipped. It is read again when it changes, so a
rotated Secret takes effect without a restart. A presented key is hashed and its digest
compared with every key's digest by ``hmac.compare_digest``, always all of them: the
time taken depends neither on which key matched nor on how much of one did, nor on the
keys' lengths. An empty file refuses every request (a missing Secret key must not open
the router).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from pathlib import Path

log = logging.getLogger("kvpilot.router")
_BEARER = b"bearer "


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def parse_keys(text: str) -> list[bytes]:
    return [line.strip().encode() for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


class ApiKeys:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._digests: list[bytes] = []
        self._stamp: tuple[int, int] | None = None
        self.reload()

    def reload(self) -> bool:
        """Read the file again if it changed (or was never read); True if it was."""
        try:
            st = os.stat(self.path)
        except OSError as err:
            if self._stamp is None:
                raise ValueError(f"API keys file {self.path}: {err.strerror}") from None
            return False  # a Secret volume being swapped: keep the keys we have
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        keys = parse_keys(self.path.read_text())
        self._digests = [_digest(k) for k in keys]
        self._stamp = stamp
        if not keys:
            log.warning("API keys file %s holds no key: every request is refused", self.path)
        else:
            log.info("API keys: %d loaded from %s", len(keys), self.path)
        return True

    def allows(self, authorization: bytes | None) -> bool:
        """Whether an ``Authorization`` header value carries one of the keys."""
        presented = b""
        if authorization and authorization[:7].lower() == _BEARER:
            presented = authorization[7:].strip()
        digest = _digest(presented)
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(digest, known)
        return found and bool(presented)
