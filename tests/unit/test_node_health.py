"""privlm-node-health on faked hardware: GPU count and ECC (a fake nvidia-smi), fabric ports (a fake sysfs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PROGRAM = REPO / "playbooks" / "roles" / "node_health" / "files" / "privlm-node-health"


def fake_nvidia_smi(bin_dir: Path, rows: list[str]) -> None:
    """An nvidia-smi that prints `index, uncorrected ECC errors` rows."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + "".join(f"echo '{r}'\n" for r in rows))
    script.chmod(0o755)


def fake_ib(root: Path, states: dict[str, str]) -> Path:
    """/sys/class/infiniband with one port per device, e.g. {"mlx5_0": "4: ACTIVE"}."""
    for dev, state in states.items():
        port = root / dev / "ports" / "1"
        port.mkdir(parents=True)
        (port / "state").write_text(state + "\n")
    return root


def health(tmp_path: Path, **config: object) -> tuple[int, dict]:
    path = tmp_path / "health.json"
    path.write_text(json.dumps({"min_free_gb": 0, **config}))
    env = {**os.environ, "PRIVLM_NODE_HEALTH_CONFIG": str(path), "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    env.pop("SLURMD_NODENAME", None)  # not run by slurmd: reports, never drains
    proc = subprocess.run([sys.executable, str(PROGRAM)], capture_output=True, text=True, env=env)
    report = json.loads(proc.stdout)  # one JSON object, nothing else on stdout
    return proc.returncode, {c["check"]: (c["status"], c["detail"]) for c in report["checks"]} | {
        "status": report["status"]}


def test_eight_healthy_gpus_on_active_infiniband(tmp_path: Path) -> None:
    fake_nvidia_smi(tmp_path / "bin", [f"{i}, 0" for i in range(8)])
    ib = fake_ib(tmp_path / "ib", {f"mlx5_{i}": "4: ACTIVE" for i in range(4)})
    rc, got = health(tmp_path, expected_gpus=8, fabric="infiniband", infiniband_sysfs=str(ib))
    assert rc == 0 and got["status"] == "healthy"
    assert got["gpus"] == ("ok", "8 GPUs, no uncorrected ECC errors")
    assert got["fabric"] == ("ok", "4 ports ACTIVE")


@pytest.mark.parametrize(("rows", "detail"), [
    ([f"{i}, 0" for i in range(7)], "7 of 8 GPUs visible"),
    ([f"{i}, {3 if i == 5 else 0}" for i in range(8)], "uncorrected ECC errors: GPU 5: 3"),
])
def test_a_missing_gpu_or_ecc_errors_make_the_node_unusable(tmp_path: Path, rows: list[str], detail: str) -> None:
    fake_nvidia_smi(tmp_path / "bin", rows)
    rc, got = health(tmp_path, expected_gpus=8)
    assert (rc, got["status"], got["gpus"]) == (2, "unusable", ("fail", detail))


def test_one_port_down_degrades_all_ports_down_is_unusable(tmp_path: Path) -> None:
    ib = fake_ib(tmp_path / "ib", {"mlx5_0": "4: ACTIVE", "mlx5_1": "1: DOWN"})
    rc, got = health(tmp_path, fabric="infiniband", infiniband_sysfs=str(ib))
    assert (rc, got["fabric"]) == (1, ("degraded", "1 of 2 ports not ACTIVE: mlx5_1/1"))
    ib = fake_ib(tmp_path / "ib2", {"mlx5_0": "1: DOWN"})
    rc, got = health(tmp_path, fabric="infiniband", infiniband_sysfs=str(ib))
    assert (rc, got["fabric"][0]) == (2, "fail")
    rc, got = health(tmp_path, fabric="efa", infiniband_sysfs=str(tmp_path / "none"))
    assert (rc, got["fabric"][0]) == (2, "fail")


def test_mounts_and_disk(tmp_path: Path) -> None:
    rc, got = health(tmp_path, mounts=["/proc"], paths=["/"])
    assert (rc, got["mounts"][0], got["disk"][0]) == (0, "ok", "ok")
    rc, got = health(tmp_path, mounts=[str(tmp_path)], paths=["/"])  # a directory, not a mount point
    assert (rc, got["mounts"][0]) == (2, "fail")
    rc, got = health(tmp_path, min_free_gb=10**9, paths=["/"])
    assert (rc, got["status"], got["disk"][0]) == (1, "degraded", "degraded")
