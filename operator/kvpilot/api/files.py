"""Loading API objects from YAML files, with one-line errors that name file and field.

The loader is as strict as ``kubectl apply`` against the API server, so ``kvpilot plan``
is a faithful pre-check: strict types, unknown fields refused, the CRD's CEL rules
checked in Python, duplicate keys refused (the API server refuses them in raw YAML with
strict field validation). Its cost is bounded whatever the file holds: the file size,
the nesting depth and the number of values (aliases counted at every use, so a "billion
laughs" document is refused before anything walks it) all have limits, and every error
is a :class:`FileError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kvpilot.api.model import Model

# A stored object is at most 1.5 MiB; a file holds a few Models.
MAX_FILE_BYTES = 2**20
MAX_DEPTH = 32  # a Model nests 5 levels deep; status and metadata a few more
MAX_VALUES = 10_000  # scalars, lists and maps per document, aliases expanded
MAX_ERRORS = 3  # validation errors listed in one message


def _c_parser() -> Any:
    try:
        from yaml.cyaml import CParser
    except ImportError:
        return None
    return CParser


class _PythonParser(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):
    def __init__(self, stream: str) -> None:
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)


# libyaml scans and parses in C when present; composing stays in Python, where the
# limits are counted.
_Parser = _c_parser() or _PythonParser


class FileError(ValueError):
    """A file that cannot be loaded, with a one-line message naming file and field."""


def _where(loc: tuple[Any, ...], extra: str = "") -> str:
    where = ".".join(str(p)[:64] for p in loc)  # map keys may be long
    if extra:
        where = f"{where}.{extra.lstrip('.')}" if where else extra.lstrip(".")
    return where or "(top level)"


def one_line(err: ValidationError) -> str:
    """The validation errors as 'field.path: message; ...', on one line.

    A rule's error is located at the field it names (as the API server reports its
    ``fieldPath``), not at the object that holds the rule.
    """
    parts = []
    for e in err.errors()[:MAX_ERRORS]:
        field = (e.get("ctx") or {}).get("field", "") if e["type"] == "rule" else ""
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{_where(e['loc'], field)}: {msg}")
    more = err.error_count() - MAX_ERRORS
    if more > 0:
        parts.append(f"{more} more error{'s' if more > 1 else ''}")
    return "; ".join(parts).replace("\n", " ")


class _StrictComposer(yaml.composer.Composer, yaml.constructor.SafeConstructor,
                      yaml.resolver.Resolver):
    """A safe loader that refuses duplicate keys and bounds depth and size."""

    PARSER: Any = None  # the scanner and parser class, set by _loader()

    def __init__(self, stream: str) -> None:
        self.PARSER.__init__(self, stream)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        self._depth = 0
        self._composed = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        self._composed += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"nested deeper than {MAX_DEPTH} levels at line "
                                     f"{mark.line + 1}")
            if self._composed > MAX_VALUES:
                raise yaml.YAMLError(f"a document holds more than {MAX_VALUES} values")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> Any:
        self._composed = 0
        node = super().compose_document()
        _check_size(node)
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if (not isinstance(key_node, yaml.ScalarNode)
                        or key_node.tag == "tag:yaml.org,2002:merge"):
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    line = key_node.start_mark.line + 1
                    raise yaml.YAMLError(f"duplicate key {key!r} at line {line}")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _loader(parser: Any) -> Any:
    return type(f"Strict{parser.__name__}Loader", (_StrictComposer, parser), {"PARSER": parser})


_LOADER = _loader(_Parser)
PYTHON_LOADER = _loader(_PythonParser)  # the same without libyaml (tests run both)


def _check_size(root: Any) -> None:
    """Refuse documents with more than MAX_VALUES values once aliases are expanded, or
    with an alias inside itself. Each distinct node is visited once."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            active.discard(key)
            children = _children(node)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[key] > MAX_VALUES:
                raise yaml.YAMLError(f"more than {MAX_VALUES} values (aliases counted "
                                     "at every use)")
            continue
        if key in sizes:
            continue
        if key in active:
            raise yaml.YAMLError("an alias refers to a node that contains it")
        active.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)


def _children(node: Any) -> list[Any]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def read_documents(path: str | Path) -> list[Any]:
    """All YAML documents of a file (empty ones skipped)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise FileError(f"{path}: cannot read: {err.strerror or err}") from err
    if len(data) > MAX_FILE_BYTES:
        raise FileError(f"{path}: larger than {MAX_FILE_BYTES // 2**20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise FileError(f"{path}: not UTF-8 text (line {line}, byte {err.start})") from err
    return parse_documents(text, str(path))


def parse_documents(text: str, where: str, loader: Any = None) -> list[Any]:
    """The YAML documents of ``text`` (empty ones skipped); errors name ``where``."""
    try:
        return [d for d in yaml.load_all(text, Loader=loader or _LOADER) if d is not None]
    except yaml.YAMLError as err:
        raise FileError(f"{where}: cannot read: {err}".replace("\n", " ")) from err
    except ValueError as err:  # e.g. an integer of 5000 digits
        first = str(err).split(":")[0].replace("\n", " ")
        raise FileError(f"{where}: cannot read: {first}") from err


def models_from_documents(docs: list[Any], where: str) -> list[Model]:
    """Every Model among ``docs``; errors name ``where`` and the document."""
    models = []
    for i, doc in enumerate(docs):
        at = where if i == 0 else f"{where} (document {i + 1})"
        if not isinstance(doc, dict) or doc.get("kind", "Model") != "Model":
            found = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
            kind = str(found)[:64]
            kind = kind if kind.isprintable() else repr(kind)  # one line, whatever it holds
            raise FileError(f"{at}: not a Model (kind: {kind})")
        try:
            models.append(Model.model_validate(doc))
        except ValidationError as err:
            raise FileError(f"{at}: {one_line(err)}") from err
    if not models:
        raise FileError(f"{where}: holds no Model")
    return models


def load_models(path: str | Path) -> list[Model]:
    """Every Model in a (multi-document) YAML file."""
    return models_from_documents(read_documents(path), str(path))
