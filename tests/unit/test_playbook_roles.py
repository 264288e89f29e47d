"""The roles' contracts, checked on the control machine only: argument specs, ansible.cfg, NFS export defaults."""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from tests.helpers import REPO

PLAYBOOKS = REPO / "playbooks"
ROLES = sorted(p for p in (PLAYBOOKS / "roles").iterdir() if p.is_dir())
VENV_BIN = Path(sys.executable).parent


def spec_of(role: Path) -> dict[str, Any]:
    return yaml.safe_load((role / "meta" / "argument_specs.yml").read_text())["argument_specs"]["main"]


def defaults_of(role: Path) -> dict[str, Any]:
    path = role / "defaults" / "main.yml"
    return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}


def templated(value: Any) -> bool:
    return "{{" in json.dumps(value)


@pytest.mark.parametrize("role", ROLES, ids=lambda p: p.name)
def test_every_role_documents_each_default_in_its_argument_spec(role: Path) -> None:
    spec = spec_of(role)
    assert spec["short_description"]
    options = spec["options"] or {}
    defaults = defaults_of(role)
    assert set(defaults) <= set(options), f"{role.name}: not in meta/argument_specs.yml: {set(defaults) - set(options)}"
    for name, option in options.items():
        assert option.get("type") and option.get("description"), f"{role.name}: {name} needs a type and a description"
    for name, value in defaults.items():
        if templated(value):  # computed from facts or other variables: the description says how
            assert "default" not in options[name], f"{role.name}: {name}'s default is a template"
        else:
            assert options[name].get("default") == value, f"{role.name}: {name} defaults to {value!r}"


def validate(role: str, arguments: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Ansible's own role-argument validation (what runs when the role starts) on `arguments`, on the control node."""
    playbook = tmp_path / "validate.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "Validate", "hosts": "localhost", "gather_facts": False, "connection": "local",
        "tasks": [{"name": "Arguments", "ansible.builtin.validate_argument_spec": {
            "argument_spec": spec_of(PLAYBOOKS / "roles" / role)["options"], "provided_arguments": arguments}}]}]))
    env = {**os.environ, "ANSIBLE_CONFIG": str(PLAYBOOKS / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCALHOST_WARNING": "false", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false"}
    return subprocess.run([str(VENV_BIN / "ansible-playbook"), str(playbook)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)


def test_role_defaults_pass_their_own_argument_specs(tmp_path: Path) -> None:
    for role in ROLES:
        values = {k: v for k, v in defaults_of(role).items() if not templated(v)}
        run = validate(role.name, values, tmp_path)
        assert run.returncode == 0, (role.name, run.stdout[-2000:])


@pytest.mark.parametrize(("role", "arguments", "message"), [
    ("common", {"common_job_uid": "many"},
     "argument 'common_job_uid' is of type str and we were unable to convert to int"),
    ("slurm_common", {"slurm_partitions": [{"name": "batch"}]},
     "missing required arguments: priority_tier found in slurm_partitions"),
    ("slurm_common", {"slurm_partitions": [{"name": "batch", "priority_tier": 1, "grace": 5}]},
     "slurm_partitions.grace. Supported parameters include"),
    ("shared_storage", {"shared_storage_mounts": [{"path": "/shared", "type": "cifs", "source": "head:/shared"}]},
     "value of type must be one of: nfs, lustre, got: cifs found in shared_storage_mounts"),
    ("monitoring", {"monitoring_state": "paused"},
     "value of monitoring_state must be one of: started, stopped, got: paused"),
    ("nccl", {"nccl_fabric": "omnipath"},
     "value of nccl_fabric must be one of: infiniband, efa, ethernet, got: omnipath"),
])
def test_argument_spec_refuses_a_wrong_value_naming_the_field(role: str, arguments: dict[str, Any], message: str,
                                                              tmp_path: Path) -> None:
    run = validate(role, arguments, tmp_path)
    assert run.returncode == 2, run.stdout[-2000:]
    assert "Validation of arguments failed" in run.stdout
    assert message in run.stdout, run.stdout[-2000:]


def test_ansible_cfg_names_no_inventory_so_a_bare_run_matches_no_host() -> None:
    config = configparser.ConfigParser()
    config.read(PLAYBOOKS / "ansible.cfg")
    assert "inventory" not in config["defaults"]
    env = {k: v for k, v in os.environ.items() if k != "ANSIBLE_INVENTORY"}
    env.update({"ANSIBLE_CONFIG": str(PLAYBOOKS / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"})
    for playbook in ("site.yml", "slurm.yml", "monitoring.yml"):
        # --list-hosts runs nothing: were there a default inventory, the hosts would be listed, not configured
        listed = subprocess.run([str(VENV_BIN / "ansible-playbook"), playbook, "--list-hosts"], capture_output=True,
                                text=True, cwd=PLAYBOOKS, env=env, timeout=120)
        assert listed.returncode == 0, listed.stderr
        counts = re.findall(r"hosts \((\d+)\)", listed.stdout)
        assert counts and set(counts) == {"0"}, listed.stdout


def render_exports(**variables: Any) -> list[str]:
    template = jinja2.Template((PLAYBOOKS / "roles" / "shared_storage" / "templates" / "exports.j2").read_text(),
                               trim_blocks=True)  # as ansible.builtin.template renders it
    text = template.render(**{**defaults_of(PLAYBOOKS / "roles" / "shared_storage"), **variables})
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_nfs_exports_squash_root_unless_the_inventory_says_otherwise() -> None:
    exports = [{"path": "/shared", "clients": "10.0.0.0/16"}, {"path": "/data", "clients": ["10.0.1.0/24", "head"]}]
    assert render_exports(shared_storage_nfs_exports=exports) == [
        "/shared 10.0.0.0/16(rw,sync,no_subtree_check,root_squash)",
        "/data 10.0.1.0/24(rw,sync,no_subtree_check,root_squash) head(rw,sync,no_subtree_check,root_squash)"]
    explicit = [{"path": "/scratch", "clients": "10.0.0.0/16", "options": "rw,sync,no_subtree_check,no_root_squash"}]
    assert render_exports(shared_storage_nfs_exports=explicit) == [
        "/scratch 10.0.0.0/16(rw,sync,no_subtree_check,no_root_squash)"]
    documented = " ".join(spec_of(PLAYBOOKS / "roles" / "shared_storage")["options"]["shared_storage_nfs_options"]
                          ["description"])
    assert "no_root_squash" in documented


def test_sysctl_limits_and_mounts_go_through_their_modules_not_commands() -> None:
    tasks = [t for role in ROLES for f in sorted((role / "tasks").glob("*.yml"))
             for t in yaml.safe_load(f.read_text()) or []]
    tasks += [t for block in tasks for t in block.get("block", [])]
    modules = {key for t in tasks for key in t if "." in key}
    assert {"ansible.posix.sysctl", "ansible.posix.mount", "community.general.pam_limits",
            "community.mysql.mysql_db", "community.mysql.mysql_user"} <= modules
    commands = [str(t.get("ansible.builtin.command", t.get("ansible.builtin.shell", ""))) for t in tasks]
    handlers = [str(t) for role in ROLES for f in (role / "handlers").glob("*.yml")
                for t in yaml.safe_load(f.read_text()) or []]
    workaround = re.compile(r"\bsysctl\b|\bmount\b|fstab|limits\.d|\b(mysql|mariadb) -|CREATE (USER|DATABASE)|GRANT ")
    for text in commands + handlers:
        assert not workaround.search(text), text
