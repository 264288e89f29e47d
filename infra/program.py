"""The Pulumi program: a stack's config (`privlm:cluster` is the cluster spec) to an AWS or on-prem cluster.

`infra/__main__.py` runs `main()` under `pulumi up`; `infra/offline.py` runs `build()` under the SDK's mocks
for tests and `privlm infra check`. The spec is validated first: errors stop the run before anything is
created, warnings are logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pulumi

from infra.spec import AwsSpec, ClusterSpec, OnPremSpec, SpecError, check_spec, parse_spec

PROJECT = "privlm"


def spec_from_config(config: pulumi.Config) -> ClusterSpec:
    """The stack's cluster spec (`privlm:cluster`, a YAML object in Pulumi.<stack>.yaml)."""
    data = config.require_object("cluster")
    if not isinstance(data, dict):
        raise SpecError("privlm:cluster: the stack's cluster spec is a mapping (provider, name, node_groups, ...)")
    return parse_spec(data)


def refuse_on_errors(spec: ClusterSpec) -> None:
    """Log the spec's warnings; raise SpecError listing every error, so nothing is created."""
    findings = check_spec(spec)
    for finding in findings:
        if finding.level == "warning":
            pulumi.log.warn(str(finding))
    errors = [str(f) for f in findings if f.level == "error"]
    if errors:
        raise SpecError(f"cluster spec {spec.name}: " + "; ".join(errors))


def build(spec: ClusterSpec, config: pulumi.Config, opts: pulumi.ResourceOptions | None = None,
          validate: bool = True) -> dict[str, Any]:
    """Create the cluster's resources; returns the stack outputs (names to values or Outputs)."""
    if validate:
        refuse_on_errors(spec)
    if isinstance(spec, AwsSpec):
        from infra.aws.cluster import AwsCluster

        return AwsCluster(spec, config.require_secret("mungeKey"), opts=opts).outputs
    if isinstance(spec, OnPremSpec):
        from infra.onprem import AnsibleSettings, OnPremCluster

        inventory = config.get("inventory")
        inventory_dir = config.get("inventoryDir")
        settings = AnsibleSettings(inventory=Path(inventory).expanduser() if inventory else None,
                                   inventory_dir=Path(inventory_dir).expanduser() if inventory_dir
                                   else AnsibleSettings.inventory_dir,
                                   check=config.get_bool("ansibleCheck") or False, tags=config.get("ansibleTags"),
                                   playbook=config.get("playbook") or "site.yml")
        return OnPremCluster(spec, settings, opts=opts).outputs
    raise SpecError(f"provider: {spec.provider!r} has no Pulumi program")


def main() -> None:
    """Entry point of `pulumi up`: build the stack's cluster and export its outputs."""
    config = pulumi.Config(PROJECT)
    for name, value in build(spec_from_config(config), config).items():
        pulumi.export(name, value)
