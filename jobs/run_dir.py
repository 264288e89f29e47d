"""The run directory: the one owner of a training run's paths and of the readers of what the trainer writes.

    <run_dir>/recipe.yaml      the resolved recipe every rank reads (written by the launcher)
              run.json         where this run keeps its checkpoints (also when `checkpoint.directory` lies
                               outside the run directory), written by rank 0 at start
              metrics.jsonl    one JSON record per line: `start`, steps, `eval`, `checkpoint`, `guard`, `stopped`,
                               `finished` (jobs/train/metrics.py writes it)
              summary.json     the finished run's outcome
              model/           the exported model; model/privlm.json is its lineage
              adapter/         a LoRA run's adapter on its own
              samples/         training.record_samples: block ids per rank and step
              tracking/        the MLflow outbox (mlops/tracking.py)

Readers (`privlm jobs`, `privlm train submit`, the monitoring exporter, the registry) open a run with
`RunDir.at(path)`; the trainer with `RunDir.of(recipe)`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.files import atomic_write_text
from jobs.train.checkpoint import TAG_RE

RUN_FILE = "run.json"
LINEAGE_FILE = "privlm.json"


@dataclass(frozen=True)
class RunDir:
    """The paths of one run and what can be read from them; nothing here needs torch."""

    path: Path
    checkpoints: Path

    @classmethod
    def of(cls, recipe: Any) -> RunDir:
        """The run directory a recipe trains into."""
        return cls(Path(recipe.run_path), Path(recipe.checkpoint_path))

    @classmethod
    def at(cls, path: str | Path, default_checkpoints: str = "checkpoints") -> RunDir:
        """An existing run directory; its checkpoints where run.json says (a run from before run.json:
        `default_checkpoints` inside it)."""
        path = Path(path)
        manifest = path / RUN_FILE
        checkpoints = path / default_checkpoints
        if manifest.is_file():
            with contextlib.suppress(ValueError, KeyError, TypeError):  # damaged: the default location
                checkpoints = Path(json.loads(manifest.read_text())["checkpoints"])
        return cls(path, checkpoints)

    def publish(self) -> None:
        """Record where the checkpoints live (rank 0, at start), so readers find them from the run alone."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / RUN_FILE, json.dumps({"checkpoints": str(self.checkpoints.resolve())}))

    # --- paths ---------------------------------------------------------------------------------------------
    @property
    def recipe_file(self) -> Path:
        return self.path / "recipe.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def lineage_file(self) -> Path:
        return self.model_dir / LINEAGE_FILE

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    @property
    def tracking_dir(self) -> Path:
        return self.path / "tracking"

    # --- readers -------------------------------------------------------------------------------------------
    def records(self) -> Iterator[dict[str, Any]]:
        """metrics.jsonl's records in order; a line still being written is skipped."""
        if not self.metrics_file.is_file():
            return
        for line in self.metrics_file.read_text(errors="replace").splitlines():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue

    def progress(self) -> tuple[int, float | None, int]:
        """(last logged step, its loss, how often the run resumed)."""
        step, loss, resumes = 0, None, 0
        for record in self.records():
            if "loss" in record:
                step, loss = record["step"], record["loss"]
            resumes += record.get("event") == "start" and bool(record.get("resumed"))
        return step, loss, resumes

    def step_seconds(self) -> float | None:
        """Seconds per optimizer step of the last logged interval, if the run has logged one."""
        step_s = None
        for record in self.records():
            if record.get("tokens_per_s") and record.get("step"):
                step_s = record["tokens"] / record["step"] / record["tokens_per_s"]
        return step_s

    def summary(self) -> dict[str, Any] | None:
        """The finished run's summary.json, None before it finished."""
        return json.loads(self.summary_file.read_text()) if self.summary_file.is_file() else None

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.summary_file, json.dumps(summary, indent=1))

    def lineage(self) -> dict[str, Any] | None:
        """The exported model's lineage (model/privlm.json), None before the export."""
        return json.loads(self.lineage_file.read_text()) if self.lineage_file.is_file() else None

    def last_checkpoint(self) -> tuple[int, float] | None:
        """(step, publication time) of the checkpoint the `latest` pointer names, None before the first."""
        latest = self.checkpoints / "latest"
        if not latest.is_file():
            return None
        m = TAG_RE.match(latest.read_text().strip())
        return (int(m.group(1)), latest.stat().st_mtime) if m else None

    def last_checkpoint_step(self) -> int | None:
        found = self.last_checkpoint()
        return found[0] if found else None
