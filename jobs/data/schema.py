"""JSON Schema checks of JSONL/Parquet records (jsonschema): refuse a bad schema up front, quarantine bad records.

A source's `record_schema` is checked against its own metaschema when the recipe loads, so an invalid schema
stops the run before anything is read. During the run, a record that fails the schema (or is not JSON, or has
no text field) is not trained on and not lost: it goes to the quarantine file with the reason.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any


def _load(path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist; point record_schema at a JSON Schema file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON ({exc}); fix the schema file") from None


def check_schema_file(path: Path) -> None:
    """Raise ValueError naming the file and the problem when it is not a valid JSON Schema."""
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    schema = _load(path)
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(map(str, exc.absolute_path)) or "(top level)"
        raise ValueError(f"{str(path)!r} is not a valid JSON Schema: at {where}: {exc.message}; fix the schema "
                         "file") from None


@functools.lru_cache(maxsize=16)
def record_validator(path: str) -> Any:
    """A validator for the schema file (the draft it declares, Draft 2020-12 by default), built once."""
    from jsonschema.validators import validator_for

    schema = _load(Path(path))
    return validator_for(schema)(schema)


def schema_problem(validator: Any, record: Any) -> str | None:
    """The first way `record` fails the schema, as 'at PATH: MESSAGE', or None when it passes."""
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(record))
    if error is None:
        return None
    where = "/".join(map(str, error.absolute_path)) or "(record)"
    return f"schema: at {where}: {error.message}"
