"""A Hugging Face checkpoint's tokenizer: ``tokenizer.json`` through the ``tokenizers``
library, the chat template of ``tokenizer_config.json`` rendered with Jinja as
transformers does, and incremental detokenization for streaming.

``encode`` goes through ``encode_batch``, which lets go of the GIL while it works
(``Tokenizer.encode`` holds it: 5 s for 5 MB of text, during which no other thread of the
process, the server's event loop included, runs Python). ``max_token_chars`` bounds the
text a context can hold before any tokenizing, and ``special_token_in`` finds text that
encoding would turn into a special token."""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer as _Tokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer.json in {model_dir}")
        self._tok = _Tokenizer.from_file(str(path))
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self._template = None

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    @cached_property
    def max_token_chars(self) -> int:
        """The most characters of text one token stands for: its longest vocabulary entry
        (byte-level vocabularies spell each byte as one character, and a character is at
        least one byte; byte-fallback entries like ``<0x0A>`` only overstate it)."""
        return max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1)

    @cached_property
    def _special(self) -> re.Pattern | None:
        names = {t.content for t in self._tok.get_added_tokens_decoder().values()
                 if t.special and t.content}
        # Longest first, so that a token that is a prefix of another does not shadow it.
        if not names:
            return None
        return re.compile("|".join(map(re.escape, sorted(names, key=len, reverse=True))))

    def special_token_in(self, text: str) -> str | None:
        """The first special token (``<|eot_id|>``) spelled out in ``text``, which
        ``encode`` would turn into that token rather than into text; None if none is."""
        found = self._special.search(text) if self._special is not None else None
        return found.group() if found else None

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The prompt text of a chat, ending where the assistant's answer begins. Without
        a template in the checkpoint, ``role: content`` lines."""
        if self.chat_template is None:
            lines = [f"{m['role']}: {m['content']}" for m in messages]
            return "\n".join(lines) + "\nassistant:"
        if self._template is None:
            from jinja2.exceptions import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=True,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # The template writes the special tokens itself (transformers does the same).
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


class Detokenizer:
    """Text of a growing list of token ids, a piece at a time.

    Decoding the whole output again at each token costs O(n) per token; decoding only the
    new token loses what depends on its neighbours (leading spaces, multi-byte characters
    split over tokens). So each step decodes a short window twice, from ``prefix`` to
    ``read`` (already emitted) and from ``prefix`` to the end, and emits the difference;
    a piece ending in U+FFFD is an incomplete character and waits for the next token.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_tail: list[int]):
        self.tok = tokenizer
        self.ids = list(prompt_tail)
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """What is still held back at the end (an incomplete character)."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""
