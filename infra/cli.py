"""`privlm cluster ...`: turn an inventory of hosts into a Slurm cluster with our playbooks."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import typer

cluster_app = typer.Typer(help="Ansible: make bare-metal GPU nodes a Slurm cluster (or check one).",
                          no_args_is_help=True)


@cluster_app.command("configure")
def configure_cmd(inventory: Path = typer.Argument(..., help="inventory directory: playbooks/inventories/local"),
                  check: bool = typer.Option(False, help="dry run (ansible --check --diff)"),
                  playbook: str = typer.Option("site.yml", help="site.yml (everything) or slurm.yml"),
                  limit: str = typer.Option(None, help="only these hosts (Ansible --limit)")) -> None:
    """Validate INVENTORY, then apply the playbook to its hosts; a rerun changes nothing."""
    from infra.cluster import configure
    from infra.inventory import InventoryError

    try:
        result = configure(inventory, playbook, check, limit)
    except InventoryError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{result.status}: {result.changed} changed, {result.failures} failed")
    raise typer.Exit(0 if result.rc == 0 else 1)


@cluster_app.command("render")
def render_cmd(spec: Path, out: Path = typer.Option(..., help="directory for hosts.yml")) -> None:
    """Write the Ansible inventory for a cluster spec YAML (infra/spec.py)."""
    from infra.inventory import write_inventory
    from infra.spec import load_spec

    typer.echo(write_inventory(load_spec(spec), out))


@cluster_app.command("health")
def health_cmd() -> None:
    """This node's health check (GPUs, fabric, mounts, disk) as JSON; exit 0 healthy, 1 degraded, 2 unusable."""
    proc = subprocess.run(["/usr/local/sbin/privlm-node-health"], capture_output=True, text=True)
    typer.echo(json.dumps(json.loads(proc.stdout), indent=1) if proc.stdout else proc.stderr)
    raise typer.Exit(proc.returncode)
