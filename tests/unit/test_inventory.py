"""Bad inventories and specs fail before any host is touched, naming the host and the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from infra.inventory import render_inventory, validate_inventory, write_inventory
from infra.spec import ClusterSpec
from tests.helpers import REPO

INVENTORIES = REPO / "playbooks" / "inventories"


@pytest.mark.parametrize("name", ["local", "local-2node", "example"])
def test_shipped_inventories_are_valid(name: str) -> None:
    assert validate_inventory(INVENTORIES / name) == []


def write(tmp_path: Path, nodes: dict) -> Path:
    inv = {"all": {"hosts": {"head": {"ansible_host": "10.0.0.1"}, **nodes},
                   "children": {"slurm_controller": {"hosts": {"head": None}},
                                "slurm_nodes": {"hosts": dict.fromkeys(nodes)}}}}
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inv))
    return tmp_path


def test_gpu_node_without_gpu_count(tmp_path: Path) -> None:
    inv = write(tmp_path, {"gpu1": {"ansible_host": "10.0.0.2", "slurm_gpu_type": "h100"}})
    assert validate_inventory(inv) == ["host gpu1: field slurm_gpus is missing or 0 but slurm_gpu_type='h100'; "
                                       "give the GPU count"]


def test_two_nodes_with_one_address(tmp_path: Path) -> None:
    inv = write(tmp_path, {"a": {"ansible_host": "10.0.0.2"}, "b": {"ansible_host": "10.0.0.2"}})
    problems = validate_inventory(inv)
    assert len(problems) == 1 and problems[0].startswith("host b: address 10.0.0.2:6818 is already used by a")


def test_cli_refuses_before_running_ansible(tmp_path: Path) -> None:
    inv = write(tmp_path, {"gpu1": {"ansible_host": "10.0.0.2", "slurm_gpu_type": "h100"}})
    out = subprocess.run([sys.executable, "-m", "privlm.cli", "cluster", "configure", str(inv)], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 2 and "host gpu1: field slurm_gpus" in out.stderr
    assert "PLAY" not in out.stdout  # no host was touched


def spec(**extra) -> dict:
    return {"name": "lab", "head": {"name": "head", "address": "10.0.0.1"},
            "node_groups": [{"name": "h100", "cpus": 224, "memory_mb": 2_000_000, "gpus": 8, "gpu_type": "h100",
                             "hosts": [{"name": "gpu01", "address": "10.0.1.1"},
                                       {"name": "gpu02", "address": "10.0.1.2"}]}],
            "fabric": "infiniband", "nfs_export": "/shared", **extra}


def test_spec_renders_a_valid_inventory(tmp_path: Path) -> None:
    path = write_inventory(ClusterSpec.model_validate(spec()), tmp_path)
    assert validate_inventory(path.parent) == []
    inv = render_inventory(ClusterSpec.model_validate(spec()))
    assert inv["all"]["hosts"]["gpu02"] == {"ansible_host": "10.0.1.2", "slurm_cpus": 224,
                                            "slurm_real_memory": 2_000_000, "slurm_gpus": 8, "slurm_gpu_type": "h100"}
    assert inv["all"]["vars"]["privlm_fabric"] == "infiniband"


def test_spec_rejects_duplicate_addresses_and_gpu_types_without_gpus() -> None:
    dup = spec()
    dup["node_groups"][0]["hosts"][1]["address"] = "10.0.1.1"
    with pytest.raises(ValidationError, match=r"host gpu02: address 10\.0\.1\.1 is already used by gpu01"):
        ClusterSpec.model_validate(dup)
    nogpu = spec()
    nogpu["node_groups"][0]["gpus"] = 0
    with pytest.raises(ValidationError, match="gpu_type='h100' but gpus=0"):
        ClusterSpec.model_validate(nogpu)
