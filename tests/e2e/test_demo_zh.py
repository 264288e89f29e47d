"""The mixed Chinese/English demo recipe (recipes/tiny-cpu-zh.yaml): prepared and trained through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import privlm, read_losses

pytestmark = [pytest.mark.e2e]


def test_tiny_cpu_zh_prepares_the_mixed_corpus_and_trains(tmp_path: Path) -> None:
    sets = ["--set", f"data.output_dir={tmp_path / 'data'}", "--set", f"run_dir={tmp_path / 'run'}",
            "--set", f"checkpoint.directory={tmp_path / 'run' / 'ckpt'}"]
    out = privlm("data", "prepare", "recipes/tiny-cpu-zh.yaml", *sets).stdout
    assert "train tokens per source: data.sources[0] 30.0%, data.sources[1] 70.0%" in out
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    assert report["quarantined_records"] == 2 and report["t2s_docs"] == 1
    assert report["dedup"]["sentences"]["removed"] == 2 and report["dedup"]["near"]["docs"] == 1
    assert {"cn_mobile", "cn_landline", "cn_resident_id"} <= set(report["pii_redactions"])
    zh = report["languages"]["zh"]
    assert zh["kept_docs"] == zh["read_docs"] == 12
    assert zh["bytes_per_token"] > 2.0  # a tokenizer trained on the stdlib alone: 1.0 (3 tokens per character)
    privlm("train", "run", "recipes/tiny-cpu-zh.yaml", *sets, "--set", "training.max_steps=24",
           "--set", "checkpoint.interval=24", "--set", "registry.tracking=false")
    losses = read_losses(tmp_path / "run")
    assert max(losses) == 24 and losses[24] < losses[min(losses)] - 1.0
