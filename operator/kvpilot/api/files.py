"""Loading API objects from YAML files, with one-line errors that name file and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kvpilot.api.model import Model


def one_line(err: ValidationError) -> str:
    """The first validation error as 'field.path: message (and N more)'."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {msg}{more}"


def read_documents(path: str | Path) -> list[Any]:
    """All YAML documents of a file (empty ones skipped)."""
    path = Path(path)
    try:
        return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read: {err}".replace("\n", " ")) from err


def load_models(path: str | Path) -> list[Model]:
    """Every Model in a (multi-document) YAML file."""
    models = []
    for i, doc in enumerate(read_documents(path)):
        where = f"{path}" if i == 0 else f"{path} (document {i + 1})"
        if not isinstance(doc, dict) or doc.get("kind", "Model") != "Model":
            raise ValueError(f"{where}: not a Model (kind: {doc.get('kind') if isinstance(doc, dict) else type(doc).__name__})")
        try:
            models.append(Model.model_validate(doc))
        except ValidationError as err:
            raise ValueError(f"{where}: {one_line(err)}") from err
    if not models:
        raise ValueError(f"{path}: holds no Model")
    return models
