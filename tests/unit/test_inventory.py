"""Bad inventories and specs fail before any host is touched, naming the host and the field."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infra.inventory import check_inventory, group_hosts, render_inventory, resolve_inventory, validate_inventory
from infra.spec import OnPremSpec, SpecError, load_spec, parse_spec
from tests.helpers import REPO

PLAYBOOKS = REPO / "playbooks"
INVENTORIES = PLAYBOOKS / "inventories"
VENV_BIN = Path(sys.executable).parent


@pytest.mark.parametrize("name", ["local", "local-2node", "example"])
def test_shipped_inventories_are_valid(name: str) -> None:
    assert validate_inventory(INVENTORIES / name) == []


def write(tmp_path: Path, nodes: dict, **group_vars: object) -> Path:
    inv = {"all": {"vars": group_vars, "hosts": {"head": {"ansible_host": "10.0.0.1"}, **nodes},
                   "children": {"slurm_controller": {"hosts": {"head": None}},
                                "slurm_nodes": {"hosts": dict.fromkeys(nodes)}}}}
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump(inv))
    return tmp_path


BAD = {
    "gpu node without a GPU count": (
        {"gpu1": {"ansible_host": "10.0.0.2", "slurm_gpu_type": "h100"}}, {},
        ["host gpu1: field slurm_gpus is missing or 0 but slurm_gpu_type=h100; give the GPU count"]),
    "two nodes with one address": (
        {"a": {"ansible_host": "10.0.0.2"}, "b": {"ansible_host": "10.0.0.2"}}, {},
        ["host b: address 10.0.0.2:6818 is already used by a (field ansible_host, or slurm_port for several "
         "slurmd on one host)"]),
    "gpus without a type": (
        {"gpu1": {"ansible_host": "10.0.0.2", "slurm_gpus": 8}}, {},
        ["host gpu1: field slurm_gpu_type is missing but slurm_gpus=8; give the GPU type (Gres=gpu:TYPE:N), "
         "e.g. h100"]),
    "cpus not a number": (
        {"n1": {"ansible_host": "10.0.0.2", "slurm_cpus": "many"}}, {},
        ["host n1: field slurm_cpus=many must be a non-negative integer"]),
    "two nodes with one Slurm name": (
        {"a": {"ansible_host": "10.0.0.2", "slurm_node_name": "n"},
         "b": {"ansible_host": "10.0.0.3", "slurm_node_name": "n"}}, {},
        ["host b: field slurm_node_name=n is already used by a"]),
    "two default partitions": (
        {"n1": {"ansible_host": "10.0.0.2"}},
        {"slurm_partitions": [{"name": "a", "priority_tier": 1, "default": True},
                              {"name": "b", "priority_tier": 2, "default": True}]},
        ["slurm_partitions: only one may have default: true, not a, b"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inventory_names_the_host_and_the_field(tmp_path: Path, case: str) -> None:
    nodes, group_vars, problems = BAD[case]
    assert validate_inventory(write(tmp_path, nodes, **group_vars)) == problems


def test_no_controller_and_no_nodes(tmp_path: Path) -> None:
    (tmp_path / "hosts.yml").write_text(yaml.safe_dump({"all": {"hosts": {"a": {"ansible_host": "10.0.0.1"}}}}))
    assert validate_inventory(tmp_path) == ["group slurm_controller: needs exactly one host, has none",
                                            "group slurm_nodes: has no hosts"]


def test_group_vars_count_as_ansible_resolves_them(tmp_path: Path) -> None:
    inv = write(tmp_path, {"gpu1": {"ansible_host": "10.0.0.2"}})
    (inv / "group_vars").mkdir()
    (inv / "group_vars" / "slurm_nodes.yml").write_text("slurm_gpu_type: a100\n")  # the count is missing
    assert validate_inventory(inv) == ["host gpu1: field slurm_gpus is missing or 0 but slurm_gpu_type=a100; "
                                       "give the GPU count"]


def test_the_playbook_refuses_the_same_inventory_before_touching_a_host(tmp_path: Path) -> None:
    nodes, _, problems = BAD["two nodes with one address"]
    inv = write(tmp_path, {**nodes, "gpu1": {"ansible_host": "10.0.0.9", "slurm_gpu_type": "h100"}})
    run = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(inv / "hosts.yml"), "site.yml"],
                         capture_output=True, text=True, cwd=PLAYBOOKS)
    assert run.returncode == 2
    assert problems[0] in run.stdout + run.stderr  # ansible-playbook and privlm say the same
    assert "host gpu1: field slurm_gpus is missing" in run.stdout + run.stderr
    assert "PLAY [Prepare every host]" not in run.stdout  # stopped in the validation play, on the control node
    assert validate_inventory(inv) == [*problems, "host gpu1: field slurm_gpus is missing or 0 but "
                                       "slurm_gpu_type=h100; give the GPU count"]


def test_cli_refuses_before_running_ansible(tmp_path: Path) -> None:
    nodes, _, problems = BAD["gpu node without a GPU count"]
    out = subprocess.run([str(VENV_BIN / "privlm"), "cluster", "configure", str(write(tmp_path, nodes))],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert problems[0] in out.stderr.replace("\n", " ") and "refused before touching any host" in out.stderr
    assert "PLAY" not in out.stdout


def test_missing_inventory() -> None:
    with pytest.raises(ValueError, match=r"no hosts\.yml"):
        check_inventory(Path("/nonexistent/inventory"))


def spec(**extra: object) -> dict:
    return {"name": "lab", "head": {"name": "head", "address": "10.0.0.1"},
            "node_groups": [{"name": "h100", "cpus": 224, "memory_mb": 2_000_000, "fabric": "infiniband",
                             "gpus": {"count": 8, "type": "h100"},
                             "hosts": [{"name": "gpu01", "address": "10.0.1.1"},
                                       {"name": "gpu02", "address": "10.0.1.2"}]},
                            {"name": "cpu", "cpus": 64, "memory_mb": 256_000,
                             "hosts": [{"name": "cpu01", "address": "10.0.2.1"}]}],
            "partitions": [{"name": "train", "priority_tier": 1, "default": True, "node_groups": ["h100"]},
                           {"name": "urgent", "priority_tier": 10, "grace_time_s": 0}],
            "storage": [{"path": "/shared"}], **extra}


def test_spec_renders_a_valid_inventory(tmp_path: Path) -> None:
    from infra.inventory import write_inventory

    parsed = parse_spec(spec())
    assert isinstance(parsed, OnPremSpec)
    path = write_inventory(parsed, tmp_path)
    assert validate_inventory(path.parent) == []
    inv = render_inventory(parsed)
    assert inv["all"]["hosts"]["gpu02"] == {"ansible_host": "10.0.1.2", "slurm_cpus": 224,
                                            "slurm_real_memory": 2_000_000, "privlm_fabric": "infiniband",
                                            "slurm_gpus": 8, "slurm_gpu_type": "h100"}
    assert "slurm_gpus" not in inv["all"]["hosts"]["cpu01"]
    assert inv["all"]["hosts"]["head"]["shared_storage_nfs_exports"] == [{"path": "/shared"}]
    assert inv["all"]["vars"]["shared_storage_mounts"] == [{"path": "/shared", "type": "nfs",
                                                            "source": "10.0.0.1:/shared"}]
    train, urgent = inv["all"]["vars"]["slurm_partitions"]
    assert train["nodes"] == "gpu01,gpu02" and "nodes" not in urgent  # empty node_groups: all nodes


def test_example_spec_describes_the_example_inventory() -> None:
    """infra/examples/onprem-h100.yaml and playbooks/inventories/example are one cluster, described twice."""
    rendered = render_inventory(load_spec(REPO / "infra" / "examples" / "onprem-h100.yaml"))
    example = resolve_inventory(INVENTORIES / "example")
    hostvars = example["_meta"]["hostvars"]
    assert group_hosts(example, "slurm_nodes") == list(rendered["all"]["children"]["slurm_nodes"]["hosts"])
    assert group_hosts(example, "slurm_controller") == ["head"]
    fields = ("ansible_host", "slurm_cpus", "slurm_real_memory", "slurm_gpus", "slurm_gpu_type", "privlm_fabric")
    for host, want in rendered["all"]["hosts"].items():
        assert {k: hostvars[host].get(k) for k in fields if k in want} == {k: want[k] for k in fields if k in want}
    for key in ("slurm_cluster_name", "slurm_accounting", "slurm_partitions", "shared_storage_mounts"):
        assert hostvars["head"][key] == rendered["all"]["vars"][key], key


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s["node_groups"][0]["hosts"][1].update(address="10.0.1.1"),
     "host gpu02: address 10.0.1.1 is already used by gpu01"),
    (lambda s: s["node_groups"][1]["hosts"][0].update(name="gpu01"), "host gpu01: name is used twice"),
    (lambda s: s["node_groups"][0].update(gpus={"type": "h100"}),
     "node_groups.0.gpus.count: required field is missing"),
    (lambda s: s["node_groups"][0].update(fabric="efa"), "node group h100: fabric='efa' exists only on AWS"),
    (lambda s: s["partitions"][1].update(default=True), "partitions: only one may have default: true"),
    (lambda s: s["partitions"][0].update(node_groups=["a100"]), "partition train: node_groups ['a100'] do not exist"),
    (lambda s: s.update(provider="gcp"), "provider: 'gcp' is not supported; use one of ['aws', 'onprem']"),
    (lambda s: s["node_groups"][0].update(gpu_type="h100"), "node_groups.0.gpu_type: unknown field"),
])
def test_bad_spec_names_the_field(change, message: str) -> None:
    data = spec()
    change(data)
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec(data)
