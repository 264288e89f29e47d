"""`privlm infra validate|check STACK`: exit codes and output; infra's CLI imports no Pulumi until it runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from infra.cli import infra_app
from infra.offline import run, stack_config
from tests.helpers import REPO

runner = CliRunner()


def test_check_runs_the_program_offline_and_reports_each_policy() -> None:
    result = runner.invoke(infra_app, ["check", "p5-spot"])
    assert result.exit_code == 0, result.output
    assert "0 violations of 7 policies (placement, efa, security-groups, encryption, imdsv2, secrets, tags)" \
        in result.output
    graph = run(stack_config("p5-spot"))
    assert f"{graph.count()} resources (1 autoscaling/group, 1 cloudwatch/logGroup," in result.output


def test_check_refuses_a_spec_with_errors_before_creating_anything(tmp_path: Path) -> None:
    config = stack_config("p4d-ondemand")
    config["privlm:cluster"]["fsx"]["capacity_gib"] = 5000
    stack = tmp_path / "Pulumi.bad.yaml"
    stack.write_text(yaml.safe_dump({"config": config}))
    result = runner.invoke(infra_app, ["check", str(stack)])
    assert result.exit_code == 2
    assert "ERROR fsx.capacity_gib: 5000 GiB is not a valid size for PERSISTENT_2" in result.output
    validate = runner.invoke(infra_app, ["validate", str(stack)])
    assert validate.exit_code == 2 and "p4d-ondemand: 1 errors, 0 warnings" in validate.output


def test_validate_and_check_print_warnings_and_exit_0(tmp_path: Path) -> None:
    config = stack_config("p5-spot")
    config["privlm:cluster"]["node_groups"][0]["capacity"]["max_price_usd_per_hour"] = 70.0
    stack = tmp_path / "Pulumi.pricey.yaml"
    stack.write_text(yaml.safe_dump({"config": config}))
    warning = "WARNING node_groups.0.capacity.max_price_usd_per_hour: 70.0 is above the on-demand price"
    for command in ("validate", "check"):
        result = runner.invoke(infra_app, [command, str(stack)])
        assert result.exit_code == 0, result.output
        assert warning in result.output, command


def test_unknown_stack_names_the_known_ones() -> None:
    result = runner.invoke(infra_app, ["check", "nope"])
    assert result.exit_code == 2
    assert "known stacks: g5-inference, onprem-4node, p4d-ondemand, p5-spot" in result.output


def test_infra_cli_and_spec_import_no_pulumi() -> None:
    code = ("import sys, infra.cli, infra.spec, infra.hardware; "
            "bad = [m for m in ('pulumi', 'pulumi_aws', 'pulumi_command') if m in sys.modules]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
