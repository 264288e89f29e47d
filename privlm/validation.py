"""One validation vocabulary for everything a user writes: recipes, cluster specs, cost scenarios and serving
settings share the strict base model and the renderer, so every refusal reads the same way:

    <source> is not a valid <what>:
      - <field.path>: <problem> (got <value>)

A check across fields (a model validator) names its fields and values itself. Only pydantic is imported,
so `privlm[cost]` has it without the training stack.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class Strict(BaseModel):
    """Base model: unknown keys are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid")


def describe(err: dict[str, Any], prefix: str = "") -> str:
    """One pydantic error as `field: problem (got value)`, with the fix where pydantic gives none."""
    loc = ".".join(str(p) for p in (*([prefix] if prefix else []), *err["loc"])) or "(top level)"
    value = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown field (check its spelling against the schema, or remove it)"
    if err["type"] == "missing":
        return f"{loc}: required field is missing; add it"
    if isinstance(value, dict):  # a check across fields: the message names them and their values
        return f"{loc}: {msg}"
    return f"{loc}: {msg} (got {value!r})"


def problems(exc: ValidationError, prefix: str = "") -> list[str]:
    """Every error of a ValidationError, one line each."""
    return [describe(e, prefix) for e in exc.errors()]


def render(exc: ValidationError, source: str, what: str) -> str:
    """The whole refusal: `SOURCE is not a valid WHAT:` and one indented line per problem."""
    return f"{source} is not a valid {what}:\n  - " + "\n  - ".join(problems(exc))
