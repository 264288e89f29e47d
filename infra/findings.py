"""The one validator shape: a spec rule (infra/spec.py) and a policy (infra/policy/) both answer with Findings.

No Pulumi import: the spec reads it before anything is created.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Level = Literal["error", "warning"]


def get(props: Any, *path: str | int, default: Any = None) -> Any:
    """A nested resource property, e.g. get(r.props, "metadataOptions", "httpTokens"); `default` when absent or
    null. The policies and the offline recorder read resources through it."""
    value = props
    for key in path:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            return default
    return default if value is None else value


@dataclass(frozen=True)
class Finding:
    """One rule's verdict: an error stops `pulumi up`, a warning is printed and allowed.

    `field` is what is wrong: a spec path (node_groups.0.fabric) or a resource name (p5-spot-head); `rule`
    names the policy that found it (empty for spec rules, whose field already says where to look).
    """

    level: Level
    field: str
    message: str
    rule: str = ""

    def __str__(self) -> str:
        where = f"[{self.rule}] {self.field}" if self.rule else self.field
        return f"{self.level.upper()} {where}: {self.message}"
