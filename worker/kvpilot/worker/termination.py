"""The reason a worker (or its weights fetch) stops, where the kubelet reads it.

One line, ``<Reason>: <message>`` (``kvpilot.api.contract``), written to the container's
termination message file before the process exits non-zero. The kubelet copies it into
the container's status (``state.terminated.message``, at most 4096 bytes), and the
operator turns it into the Model's ``Degraded`` condition and an Event. The kubelet
makes the default file in every container; where it does not exist (not in a pod) and
no other path is set, the line is only logged.
"""

from __future__ import annotations

import logging
import os

from kvpilot.api import contract

log = logging.getLogger("kvpilot.worker")

MAX_MESSAGE = 4096  # what the kubelet keeps of a termination message


def termination_line(reason: str, message: str) -> str:
    """The line written for ``reason``: one line, cut to what the kubelet keeps."""
    text = f"{reason}: {' '.join(message.split())}"
    encoded = text.encode()
    if len(encoded) > MAX_MESSAGE:
        text = encoded[:MAX_MESSAGE - 3].decode(errors="ignore") + "..."
    return text


def write_termination(reason: str, message: str) -> str:
    """Log the reason and write it to the termination message file; returns the line."""
    line = termination_line(reason, message)
    log.error("%s", line)
    path = os.environ.get(contract.ENV_TERMINATION_LOG)
    if path is None:
        if not os.path.exists(contract.TERMINATION_LOG):
            return line
        path = contract.TERMINATION_LOG
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(line)
    except OSError as err:  # the log line above is all there is
        log.debug("no termination message file at %s: %s", path, err)
    return line
