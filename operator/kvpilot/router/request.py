"""What the router reads of a request body: its ``model`` and the head of its prompt.

The body is forwarded as received, byte for byte; the router never re-serializes it and
leaves every other check to the worker (which validates strictly, and answers its own
400s). ``parse`` raises ``BadRequest`` only for what the router itself needs: a JSON
object with a non-empty string ``model``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from kvpilot.router.prefix import prompt_head


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


@dataclass(frozen=True)
class RequestHead:
    model: str
    prompt_head: str  # at most the ``head_chars`` asked for


def parse(raw: bytes, head_chars: int) -> RequestHead:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise BadRequest("the request body is nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, a huge integer
        raise BadRequest(f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("the request has no `model`: name the model to use "
                         "(GET /v1/models lists them)", param="model")
    return RequestHead(model, prompt_head(body, head_chars))
