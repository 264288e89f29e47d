"""On-prem through Pulumi under the mocks: the rendered inventory, the Ansible commands and their triggers."""

from __future__ import annotations

import copy
import shlex
import shutil
from pathlib import Path

import yaml

from infra.cluster import PLAYBOOKS, playbooks_digest
from infra.inventory import render_inventory
from infra.offline import Graph, Recorded, check, run, stack_config
from infra.spec import OnPremSpec, parse_spec

COMMAND = "command:local:Command"


def onprem(tmp_path: Path, address: str = "10.0.1.14") -> tuple[Graph, dict]:
    cfg = copy.deepcopy(stack_config("onprem-4node"))
    cfg["privlm:cluster"]["node_groups"][0]["hosts"][3]["address"] = address
    cfg["privlm:inventoryDir"] = str(tmp_path)
    return run(cfg, stack="onprem-4node"), cfg


def commands(graph: Graph) -> dict[str, Recorded]:
    return {r.name.rsplit("-", 1)[1]: r for r in graph.of_type(COMMAND)}


def test_pulumi_up_renders_the_spec_inventory_and_runs_site_yml_on_it(tmp_path: Path) -> None:
    graph, cfg = onprem(tmp_path)
    assert graph.count() == 2 and check(graph) == []
    hosts = tmp_path / "privlm-h100" / "hosts.yml"
    spec = parse_spec(cfg["privlm:cluster"])
    assert isinstance(spec, OnPremSpec)
    assert yaml.safe_load(hosts.read_text()) == render_inventory(spec)
    configure = commands(graph)["configure"].inputs
    assert shlex.split(configure["create"])[1:] == ["-i", str(hosts), "site.yml"]
    assert configure["update"] == configure["create"] and configure["dir"] == str(PLAYBOOKS)
    assert configure["environment"]["ANSIBLE_CONFIG"] == str(PLAYBOOKS / "ansible.cfg")
    assert graph.outputs["inventory"] == str(hosts) and graph.outputs["partitions"] == ["train", "urgent"]
    assert parse_spec(yaml.safe_load(graph.outputs["cluster_spec"])) == spec


def test_destroy_drains_every_node_and_up_never_does(tmp_path: Path) -> None:
    graph, _ = onprem(tmp_path)
    drain = commands(graph)["drain"].inputs
    assert drain["create"] == "true" and "triggers" not in drain  # a playbook change never drains
    args = shlex.split(drain["delete"])
    assert args[1:3] == ["slurm_controller", "-i"] and "--check" not in args
    assert "scontrol update nodename=$node state=drain reason='pulumi destroy'" in args[-1]
    assert "delete" not in commands(graph)["configure"].inputs


def test_triggers_follow_the_inventory_and_the_playbooks(tmp_path: Path) -> None:
    first = commands(onprem(tmp_path / "a")[0])["configure"].inputs["triggers"]
    again = commands(onprem(tmp_path / "b")[0])["configure"].inputs["triggers"]
    moved = commands(onprem(tmp_path / "c", address="10.0.1.99")[0])["configure"].inputs["triggers"]
    assert first == again and first[1] == playbooks_digest()
    assert moved[0] != first[0] and moved[1] == first[1]
    copy_ = tmp_path / "playbooks"
    shutil.copytree(PLAYBOOKS, copy_)
    assert playbooks_digest(copy_) == playbooks_digest()
    site = copy_ / "site.yml"
    site.write_text(site.read_text() + "\n# changed\n")
    assert playbooks_digest(copy_) != playbooks_digest()


def test_the_example_stack_is_the_example_spec() -> None:
    from infra.spec import load_spec
    from tests.helpers import REPO

    stack = parse_spec(stack_config("onprem-4node")["privlm:cluster"])
    assert stack == load_spec(REPO / "infra" / "examples" / "onprem-h100.yaml")
