"""`pip install "privlm[cost]"` is enough for `privlm cost report` and `privlm plan`: a fresh venv, installed
from PyPI with requirements/lock.txt as constraints, runs both without torch, ray, deepspeed, mlflow or pulumi.

Slow (one venv, ~25 s with pip's cache warm, a few minutes cold): built once for the module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

# top-level folders of a checkout that are not the project's source (outputs, caches, environments)
NOT_SOURCE = {".git", ".venv", "runs", "data", "mlflow", "build", ".torch_extensions", ".pytest_cache", ".ruff_cache",
              ".whl", "benchmarks", "tests", "playbooks"}


@pytest.fixture(scope="module")
def cost_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """A venv holding privlm[cost] only, built from a copy of the source (the checkout gets no build/ folder)."""
    root = tmp_path_factory.mktemp("install-cost")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=lambda folder, names: [n for n in names if (
        Path(folder) == REPO and n in NOT_SOURCE) or n == "__pycache__" or n.endswith(".egg-info")])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(COLUMNS="200", PIP_DISABLE_PIP_VERSION_CHECK="1")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c",
                          str(REPO / "requirements" / "lock.txt"), f"{src}[cost]"],
                         capture_output=True, text=True, env=env, timeout=540)
    assert pip.returncode == 0, pip.stderr[-3000:]
    yield venv, env


def privlm(venv_env: tuple[Path, dict[str, str]], *args: str) -> subprocess.CompletedProcess[str]:
    venv, env = venv_env
    return subprocess.run([str(venv / "bin" / "privlm"), *args], capture_output=True, text=True, env=env,
                          cwd=venv.parent, timeout=120)


def test_the_cost_extra_installs_none_of_the_heavy_stations(cost_venv: tuple[Path, dict[str, str]]) -> None:
    venv, env = cost_venv
    probe = ("import importlib.util, json; print(json.dumps({m: importlib.util.find_spec(m) is not None for m in "
             "('torch', 'ray', 'deepspeed', 'mlflow', 'pulumi', 'pulumi_aws', 'ansible_runner', 'matplotlib')}))")
    found = json.loads(subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                                      env=env, cwd=venv.parent, check=True).stdout)
    assert found == {"torch": False, "ray": False, "deepspeed": False, "mlflow": False, "pulumi": False,
                     "pulumi_aws": False, "ansible_runner": False, "matplotlib": True}
    version = privlm(cost_venv, "--version")
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert version.returncode == 0 and version.stdout.strip() == f"privlm {declared}"


def test_cost_report_runs_from_the_cost_extra(cost_venv: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    scenario = str(REPO / "recipes" / "cost" / "h100-buy-vs-p5-rent.yaml")
    numbers = privlm(cost_venv, "cost", "report", scenario, "--json")
    assert numbers.returncode == 0, numbers.stderr
    a = json.loads(numbers.stdout)
    assert a["scenario"] == "h100-buy-vs-p5-rent" and a["cloud"]["gpu_hours"] > 0 and a["cheaper"] in a["totals"]
    drawn = privlm(cost_venv, "cost", "report", scenario, "--out", str(tmp_path / "report"))
    assert drawn.returncode == 0, drawn.stderr
    assert (tmp_path / "report" / "report.md").is_file() and (tmp_path / "report" / "report.html").is_file()


def test_plan_runs_from_the_cost_extra(cost_venv: tuple[Path, dict[str, str]]) -> None:
    plan = privlm(cost_venv, "plan", "--recipe", str(REPO / "recipes" / "llama-1b-8gpu.yaml"))
    assert plan.returncode == 0, plan.stderr
    assert "training memory per GPU" in plan.stdout and "total GPU-hours:" in plan.stdout
    assert "the recipe as written: 8 GPUs" in plan.stdout


def test_a_station_outside_the_extra_names_its_install(cost_venv: tuple[Path, dict[str, str]]) -> None:
    train = privlm(cost_venv, "train", "run", str(REPO / "recipes" / "tiny-cpu.yaml"))
    assert train.returncode == 5
    assert 'this command needs torch, which is not installed: pip install "privlm[train]"' in train.stderr
