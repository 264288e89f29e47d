"""`privlm cluster ...`: make an inventory of hosts a Slurm cluster with our playbooks, or check a node."""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict
from pathlib import Path

import typer

cluster_app = typer.Typer(help="Ansible: make bare-metal GPU nodes a Slurm cluster (or check one).",
                          no_args_is_help=True)

NODE_HEALTH = Path("/usr/local/sbin/privlm-node-health")


@cluster_app.command("configure")
def configure_cmd(inventory: Path = typer.Argument(..., help="inventory directory, e.g. playbooks/inventories/local"),
                  check: bool = typer.Option(False, "--check", help="dry run: report what would change"),
                  limit: str | None = typer.Option(None, "--limit", help="only these hosts (Ansible --limit)"),
                  tags: str | None = typer.Option(None, "--tags", help="only roles with these tags, e.g. hardware"),
                  playbook: str = typer.Option("site.yml", help="site.yml (everything) or slurm.yml (Slurm only)"),
                  quiet: bool = typer.Option(False, "--quiet", help="no task-by-task progress")) -> None:
    """Validate INVENTORY, then apply the playbook to its hosts; a rerun changes nothing."""
    from infra.cluster import configure
    from infra.inventory import InventoryError

    try:
        result = configure(inventory, playbook, check=check, limit=limit, tags=tags, quiet=quiet)
    except InventoryError as exc:
        typer.secho(f"refused before touching any host: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{result.status}: {result.changed} changed, {result.failures} failed")
    raise typer.Exit(0 if result.ok else 1)


@cluster_app.command("render")
def render_cmd(spec_file: Path = typer.Argument(..., metavar="SPEC", help="cluster spec YAML (infra/spec.py)"),
               out: Path = typer.Option(..., "--out", help="directory for hosts.yml")) -> None:
    """Write the Ansible inventory of an on-prem cluster spec."""
    from infra.inventory import write_inventory
    from infra.spec import OnPremSpec, SpecError, load_spec

    try:
        spec = load_spec(spec_file)
    except SpecError as exc:
        typer.secho(f"{spec_file}: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    if not isinstance(spec, OnPremSpec):
        typer.secho(f"{spec_file}: provider {spec.provider} gets its inventory from its infrastructure run", err=True)
        raise typer.Exit(2)
    typer.echo(write_inventory(spec, out))


@cluster_app.command("health")
def health_cmd(program: Path = typer.Option(NODE_HEALTH, help="the check the node_health role installs")) -> None:
    """This node's health (GPUs, fabric, mounts, disk) as JSON; exit 0 healthy, 1 degraded, 2 unusable."""
    if not program.exists():
        typer.secho(f"{program} is missing: apply the playbook to this node first (privlm cluster configure)",
                    fg="red", err=True)
        raise typer.Exit(2)
    proc = subprocess.run([str(program)], capture_output=True, text=True)
    try:
        typer.echo(json.dumps(json.loads(proc.stdout), indent=1))
    except json.JSONDecodeError:
        typer.secho(proc.stdout + proc.stderr, err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(proc.returncode)


infra_app = typer.Typer(help="Pulumi: validate a stack's cluster spec and check its resources offline.",
                        no_args_is_help=True)


STACK_HELP = "stack name (infra/stacks/Pulumi.STACK.yaml, else the template infra/stacks/STACK.template.yaml) or a file"


@infra_app.command("validate")
def validate_cmd(stack: str = typer.Argument(..., help=STACK_HELP),
                 as_json: bool = typer.Option(False, "--json", help="one JSON object: cluster, errors, findings")
                 ) -> None:
    """The spec rules' errors and warnings for a stack; exit 0 when `pulumi up` would start, 2 otherwise."""
    from infra.offline import stack_config
    from infra.spec import SpecError, check_spec, parse_spec

    try:
        spec = parse_spec(stack_config(stack).get("privlm:cluster") or {})
    except (SpecError, FileNotFoundError) as exc:
        typer.secho(f"{stack}: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    findings = check_spec(spec)
    errors = sum(f.level == "error" for f in findings)
    if as_json:
        typer.echo(json.dumps({"stack": stack, "cluster": spec.name, "errors": errors,
                               "warnings": len(findings) - errors, "findings": [asdict(f) for f in findings]},
                              indent=1))
        raise typer.Exit(2 if errors else 0)
    for finding in findings:
        typer.secho(str(finding), fg="red" if finding.level == "error" else "yellow")
    typer.echo(f"{spec.name}: {errors} errors, {len(findings) - errors} warnings")
    raise typer.Exit(2 if errors else 0)


@infra_app.command("check")
def check_cmd(stack: str = typer.Argument(..., help=STACK_HELP),
              as_json: bool = typer.Option(False, "--json", help="one JSON object: resources, policies, findings")
              ) -> None:
    """Run the Pulumi program offline (SDK mocks) and the policy pack (infra/policy) on its resources; exit 1 on
    an error."""
    from infra.offline import check, resource_types, run, stack_config
    from infra.policy.rules import POLICIES
    from infra.spec import SpecError, check_spec, parse_spec

    try:
        graph = run(stack_config(stack), stack=Path(stack).name.removeprefix("Pulumi.").split(".")[0])
    except (SpecError, FileNotFoundError) as exc:
        typer.secho(f"{stack}: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    spec_findings = check_spec(parse_spec(stack_config(stack)["privlm:cluster"]))  # errors stopped run() already
    findings = check(graph)
    errors = sum(f.level == "error" for f in findings)
    if as_json:
        typer.echo(json.dumps({"stack": stack, "resources": graph.count(), "resource_types": resource_types(graph),
                               "policies": [p.name for p in POLICIES], "errors": errors,
                               "findings": [asdict(f) for f in findings],
                               "spec_warnings": [asdict(f) for f in spec_findings]}, indent=1))
        raise typer.Exit(1 if errors else 0)
    for finding in spec_findings:
        typer.secho(str(finding), fg="yellow")
    for finding in findings:
        typer.secho(str(finding), fg="red" if finding.level == "error" else "yellow")
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(resource_types(graph).items()))
    typer.echo(f"{graph.count()} resources ({kinds})")
    typer.echo(f"{errors} violations of {len(POLICIES)} policies ({', '.join(p.name for p in POLICIES)})")
    raise typer.Exit(1 if errors else 0)
