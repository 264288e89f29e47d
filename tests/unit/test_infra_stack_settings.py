"""Pulumi.yaml and Pulumi.example.yaml: the project points at infra/, and the example documents every setting."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from infra import spec as specs
from infra.offline import check, run
from infra.spec import check_spec, parse_spec
from tests.helpers import REPO

EXAMPLE = REPO / "Pulumi.example.yaml"


def test_project_runs_infra_with_python_and_finds_the_example_stacks() -> None:
    project = yaml.safe_load((REPO / "Pulumi.yaml").read_text())
    assert (project["name"], project["runtime"]["name"], project["main"]) == ("privlm", "python", "infra/")
    assert (REPO / project["main"] / "__main__.py").is_file()
    templates = sorted(p.name for p in (REPO / project["stackConfigDir"]).glob("*.template.yaml"))
    assert templates == ["g5-inference.template.yaml", "onprem-4node.template.yaml", "p4d-ondemand.template.yaml",
                         "p5-spot.template.yaml"]
    assert project["template"]["config"]["privlm:mungeKey"]["secret"] is True


def test_stack_files_are_ignored_and_the_shipped_files_hold_no_ciphertext() -> None:
    """`pulumi config set --secret` writes into infra/stacks/Pulumi.<stack>.yaml: ignored; templates are not."""
    shipped = [REPO / "Pulumi.yaml", REPO / "Pulumi.example.yaml", *(REPO / "infra" / "stacks").glob("*.template.yaml")]
    paths = [str(p.relative_to(REPO)) for p in shipped] + ["infra/stacks/Pulumi.mycluster.yaml"]
    ignored = subprocess.run(["git", "check-ignore", *paths], cwd=REPO, capture_output=True, text=True).stdout.split()
    assert ignored == ["infra/stacks/Pulumi.mycluster.yaml"]
    tracked = subprocess.run(["git", "ls-files", "infra/stacks"], cwd=REPO, capture_output=True, text=True).stdout
    assert "Pulumi." not in tracked and tracked.count(".template.yaml") == 4
    for path in shipped[2:]:
        assert "secure:" not in path.read_text() and "encryptionsalt" not in path.read_text(), path


def test_a_stack_of_your_own_comes_before_the_template_of_that_name(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from infra import offline

    for template in (REPO / "infra" / "stacks").glob("*.template.yaml"):
        (tmp_path / template.name).write_text(template.read_text())
    mine = yaml.safe_load((tmp_path / "p5-spot.template.yaml").read_text())
    mine["config"]["privlm:cluster"]["name"] = "mine"
    (tmp_path / "Pulumi.p5-spot.yaml").write_text(yaml.safe_dump(mine))
    monkeypatch.setattr(offline, "STACKS", tmp_path)
    assert offline.stack_config("p5-spot")["privlm:cluster"]["name"] == "mine"
    assert offline.stack_config("p4d-ondemand")["privlm:cluster"]["name"] == "p4d-ondemand"
    with pytest.raises(FileNotFoundError, match=r"stack nope: .*known stacks: g5-inference, onprem-4node, "
                                                r"p4d-ondemand, p5-spot .*cp infra/stacks/TEMPLATE.template.yaml"):
        offline.stack_config("nope")


def test_example_is_a_valid_stack_that_passes_every_policy() -> None:
    config = yaml.safe_load(EXAMPLE.read_text())["config"]
    assert check_spec(parse_spec(config["privlm:cluster"])) == []
    assert check(run(config)) == []


def models() -> list[type[BaseModel]]:
    return [m for m in vars(specs).values()
            if isinstance(m, type) and issubclass(m, BaseModel) and m.__module__ == specs.__name__]


def test_example_documents_every_spec_field_and_program_setting() -> None:
    text = EXAMPLE.read_text()
    fields = {name for model in models() for name in model.model_fields}
    onprem_only = {"address", "hosts", "cpus", "memory_mb"}  # in the commented on-prem spec
    undocumented = sorted(f for f in fields if not re.search(rf"^\s*(- )?#?\s*{f}:|[{{ ]{f}:", text, re.MULTILINE))
    assert undocumented == [], undocumented
    assert onprem_only <= fields
    settings = set(re.findall(r'config\.(?:get|get_bool|require_secret|require_object)\("(\w+)"\)',
                              (REPO / "infra" / "program.py").read_text()))
    assert settings == {"cluster", "mungeKey", "inventory", "inventoryDir", "ansibleCheck", "ansibleTags", "playbook"}
    assert sorted(s for s in settings if f"privlm:{s}:" not in text) == []


def test_the_entry_point_pulumi_runs_exports_what_the_offline_run_records() -> None:
    """infra/__main__.py, run as `pulumi up` runs it, under the same mocks: same resources, every output exported."""
    import runpy

    import pulumi

    from infra.offline import RecordingMocks, stack_config

    config = stack_config("p4d-ondemand")
    offline = run(config)
    recorder = RecordingMocks()
    pulumi.runtime.set_all_config({"privlm:cluster": json.dumps(config["privlm:cluster"]), "privlm:mungeKey": "k"},
                                  secret_keys=["privlm:mungeKey"])
    pulumi.runtime.set_mocks(type("M", (pulumi.runtime.Mocks,), {"new_resource": lambda _, a: recorder.new_resource(a),
                                                                 "call": lambda _, a: recorder.call(a)})(),
                             project="privlm", stack="p4d-ondemand", preview=False)
    exported: dict[str, object] = {}

    @pulumi.runtime.test
    def entry_point() -> pulumi.Output:
        runpy.run_path(str(REPO / "infra" / "__main__.py"), run_name="__main__")
        stack = pulumi.runtime.get_root_resource()
        return pulumi.Output.from_input(stack.outputs).apply(exported.update)  # type: ignore[union-attr]

    entry_point()
    assert sorted((r.type, r.name) for r in recorder.recorded) == sorted((r.type, r.name) for r in offline.resources)
    assert set(exported) == set(offline.outputs) >= {"head_address", "partitions", "bucket", "fsx_mount_name",
                                                     "cluster_spec"}
