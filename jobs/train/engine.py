"""The training loop, top to bottom: one rank of a DeepSpeed pretraining or fine-tuning run.

Run by `privlm train run` (which starts N of these) or directly by torchrun/Slurm with RANK and
WORLD_SIZE set: `python -m jobs.train.engine RECIPE.yaml`.
"""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jobs.launch.preemption import DIVERGED, FINISHED, REFUSED, REQUEUE_SIGNAL, StopRequest, stopped_code
from jobs.recipe import Recipe, load_recipe
from jobs.run_dir import RunDir
from jobs.train import checkpoint as ckpt
from jobs.train.distributed import RankInfo, all_reduce_max, all_reduce_mean, init_distributed
from jobs.train.metrics import MetricsWriter, StepProgress, ThroughputMeter, format_step, peak_flops
from jobs.train.schedule import CheckpointSchedule


@dataclass
class Position:
    """Where the run is: optimizer steps, tokens and *global samples consumed* (the data position, which
    does not depend on the world size), the sample ranges skipped by the divergence guard, validation."""

    step: int = 0
    tokens: int = 0
    samples: int = 0
    skips: list[list[int]] = field(default_factory=list)
    best_loss: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    rollbacks: int = 0
    finished: bool = False

    @classmethod
    def restore(cls, state: dict[str, Any], global_batch: int) -> Position:
        step = int(state["step"])  # checkpoints from before the data position was kept: step x batch
        return cls(step, int(state["tokens"]), int(state.get("samples", step * global_batch)),
                   [list(r) for r in state.get("skips", [])], state.get("best_loss"), state.get("best_step"),
                   int(state.get("evals_since_best", 0)), int(state.get("rollbacks", 0)),
                   bool(state.get("finished", False)))

    def client_state(self) -> dict[str, Any]:
        return asdict(self)

    def next_batch_start(self, global_batch: int) -> int:
        """Skip the ranges the guard marked bad; return the first sample of the next global batch."""
        while [self.samples, self.samples + global_batch] in self.skips:
            self.samples += global_batch
        return self.samples


def train(recipe: Recipe) -> int:
    """Train one rank to the end (exit 0), to a stop signal (checkpoint, exit 128+signal), or until the
    divergence guard gives up (exit 3); the codes are jobs/launch/preemption.py's."""
    t_start = time.perf_counter()
    stop = StopRequest()
    rank = init_distributed(recipe.training.threads_per_process)
    _quiet_libraries()
    log, run, t = _logger(rank), RunDir.of(recipe), recipe.training
    if rank.is_main:
        run.publish()

    from jobs.train.parallel import Layout, Runner

    data = TrainData(recipe)
    layout = Layout.of(recipe, rank)
    manager = ckpt.CheckpointManager(recipe.checkpoint_path, rank, keep=recipe.checkpoint.keep,
                                     checksums=recipe.checkpoint.verify_checksums, exclude_frozen=_is_lora(recipe))
    sync = _restore_and_sync(recipe, rank)
    try:  # every rank sees the same checkpoint and refuses alike
        resume = manager.find(rank.world_size, _layout_meta(layout), _data_fingerprint(recipe))
    except ckpt.CheckpointError as refused:
        log(f"cannot resume: {refused}")
        return REFUSED
    model, total = _build(recipe, rank, data.train.eos_id)
    runner = Runner(recipe, rank, model, load_universal=resume is not None and resume.universal)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable), "
        f"ZeRO-{recipe.deepspeed.zero_stage} {recipe.deepspeed.precision}, {rank.world_size} ranks on {rank.device} "
        f"({layout.describe()}), gradient accumulation {t.gradient_accumulation(layout.data)}")

    pos, loop, load_seconds = _resume(manager, runner, resume, t.global_batch_size, log)
    if (pos.step >= t.total_steps or pos.finished) and _already_exported(run, pos):
        log(f"already trained to step {pos.step}; model in {run.model_dir} (nothing to do)")
        return FINISHED
    s = _Session(recipe, rank, data, runner, manager, sync, _spot_watcher(recipe, rank, stop))
    s.begin(pos, loop, resume, load_seconds, total)

    while s.pos.step < t.total_steps:
        loss, micro_count, norm_before = s.train_step()
        signum, bad = stop.agreed(s.guard.judge(loss / micro_count))
        if bad:
            if not s.roll_back(loss / micro_count):
                return s.close(DIVERGED)
            continue
        s.advance(loss, micro_count, norm_before)
        improved, stop_early = s.validate() if s.eval_due() else (False, False)
        if s.schedule.due(s.pos.step, stopping=bool(signum), improved=improved, ending=stop_early):
            s.save(best=improved, finished=stop_early or s.pos.step == t.total_steps)
        if signum:
            s.log(f"stopping on {signal.Signals(signum).name} after step {s.pos.step}; rerun the same command "
                  "to resume")
            s.metrics.write({"event": "stopped", "step": s.pos.step, "signal": signum})
            return s.close(stopped_code(signum))
        if stop_early:
            s.log(f"early stopping at step {s.pos.step}: no improvement for {s.pos.evals_since_best} evaluations; "
                  f"best eval loss {s.pos.best_loss:.4f} at step {s.pos.best_step}")
            break

    s.close(FINISHED)
    final_step = s.pos.step
    if t.early_stopping is not None and s.pos.best_step not in (None, s.pos.step):
        s.restore_best()  # export the best validated weights
    eval_loss = runner.eval_loss(data.eval) if data.eval is not None else None
    method_eval = _method_eval(recipe, runner, data)
    _export(recipe, runner, rank, s.pos, layout, eval_loss, method_eval)
    summary = {"event": "finished", "step": final_step, "exported_step": s.pos.step, "tokens": s.pos.tokens,
               "samples": s.pos.samples, "eval_loss": eval_loss, **method_eval,
               "eval_perplexity": float(np.exp(eval_loss)) if eval_loss is not None else None,
               "best_step": s.pos.best_step, "early_stopped": final_step < t.total_steps,
               "guard_rollbacks": s.pos.rollbacks, "skipped_batches": len(s.pos.skips),
               "wall_seconds": time.perf_counter() - t_start, "model_dir": str(run.model_dir)}
    s.metrics.write(summary)
    s.metrics.close("FINISHED", {k: v for k, v in summary.items() if k not in ("event",) and v is not None})
    if rank.is_main:
        run.write_summary(summary)
    log(f"done: model in {summary['model_dir']}, eval loss {eval_loss}")
    return FINISHED


class TrainData:
    """The prepared splits and the resumable sampler: which blocks each rank trains on for a data position."""

    def __init__(self, recipe: Recipe) -> None:
        from jobs.data.pack import PackedDataset, ResumableSampler

        self.recipe = recipe
        self.train = PackedDataset(recipe.data_path, "train")
        self.eval = _eval_split(recipe)
        _check_data(recipe, self.train)
        self.sampler = ResumableSampler(len(self.train), recipe.training.seed)

    def micro_batches(self, start: int, layout: Any) -> list[np.ndarray]:
        """Block ids of this rank's micro-batches of the global batch that begins at sample `start`."""
        t = self.recipe.training
        mb = t.micro_batch_size
        return [self.sampler.indices(start + m * mb * layout.data + layout.data_rank * mb, mb)
                for m in range(t.gradient_accumulation(layout.data))]


class _Session:
    """The state of one rank's loop (position, running loss, guard, cadence) and its step-level actions."""

    def __init__(self, recipe: Recipe, rank: RankInfo, data: TrainData, runner: Any,
                 manager: ckpt.CheckpointManager, sync: Any, watcher: Any) -> None:
        self.recipe, self.rank, self.data, self.runner = recipe, rank, data, runner
        self.manager, self.sync, self.watcher = manager, sync, watcher
        self.schedule = CheckpointSchedule.of(recipe.checkpoint, recipe.training.total_steps)
        self.samples_log = _SampleLog(recipe, rank, runner.layout) if recipe.training.record_samples else None
        self.guard = _Guard(recipe)
        self.start, self.micro = 0, []

    def begin(self, pos: Position, loop: dict[str, Any], resume: Any, load_seconds: float, params: int) -> None:
        """Open the metrics (file and MLflow) with the `start` record, the progress bar and the meters."""
        from jobs.train.model import flops_per_token

        recipe, rank, t = self.recipe, self.rank, self.recipe.training
        self.pos = pos
        peak, peak_source = peak_flops(rank.device, recipe.deepspeed.precision)
        self.meter = ThroughputMeter(flops_per_token(recipe.model, params, t.sequence_length),
                                     peak * rank.world_size)
        tracker = _tracker(recipe, rank, pos.step if resume is not None else None, params)
        self.metrics = MetricsWriter(RunDir.of(recipe).metrics_file, enabled=rank.is_main, tracker=tracker)
        self.metrics.write({"event": "start", "step": pos.step, "samples": pos.samples, "resumed": resume is not None,
                            "reshaped": bool(resume and resume.reshaped), "load_seconds": load_seconds,
                            "peak_flops_per_rank": peak, "peak_source": peak_source, "world_size": rank.world_size,
                            "layout": _layout_meta(self.runner.layout), "params": params})
        self.progress = StepProgress(t.total_steps, pos.step, enabled=rank.is_main)
        self.log = self.progress.log if rank.is_main else _logger(rank)
        # the running loss of the current log interval: restored, so a resume inside an interval logs the same mean
        self.loss_sum, self.loss_count = float(loop.get("loss_sum", 0.0)), int(loop.get("loss_count", 0))
        self.step_started, self.step_seconds = time.perf_counter(), 0.0

    def train_step(self) -> tuple[float, int, float | None]:
        """One optimizer step on the next global batch: (sum of micro-batch losses, how many, grad norm)."""
        t = self.recipe.training
        self.start = self.pos.next_batch_start(t.global_batch_size)
        self.micro = self.data.micro_batches(self.start, self.runner.layout)
        scale = float("nan") if ckpt.fault_at("bad_batch", self.start // t.global_batch_size + 1, self.rank) else 1.0
        return self.runner.train_step([self.data.train.get_batch(i) for i in self.micro], scale)

    def advance(self, loss: float, micro_count: int, norm_before: float | None) -> None:
        """Count the step that every rank agreed was good; log the interval's mean loss when due."""
        t = self.recipe.training
        if self.samples_log is not None:
            self.samples_log.write(self.pos.step + 1, self.micro)
        pos = self.pos
        pos.step, pos.tokens = pos.step + 1, pos.tokens + t.tokens_per_step
        pos.samples = self.start + t.global_batch_size
        self.loss_sum, self.loss_count = self.loss_sum + loss, self.loss_count + micro_count
        now = time.perf_counter()
        self.step_seconds, self.step_started = now - self.step_started, now
        self.meter.add(t.tokens_per_step)
        self.progress.advance(pos.step)
        if pos.step % t.log_every and pos.step != t.total_steps:
            return
        mean_loss, = all_reduce_mean([self.loss_sum / self.loss_count])
        record = {"step": pos.step, "loss": mean_loss, "lr": self.runner.engine.get_lr()[0], "tokens": pos.tokens,
                  "samples": pos.samples, "grad_norm": self.runner.grad_norm(norm_before), **self.meter.report(),
                  **self.runner.objective.report()}
        self.metrics.write(record)
        self.log(format_step(record, t.total_steps))
        self.progress.advance(pos.step, f"loss {record['loss']:.3f}")
        self.loss_sum, self.loss_count = 0.0, 0

    def eval_due(self) -> bool:
        every = self.recipe.training.eval_every
        return self.data.eval is not None and bool(every) and self.pos.step % every == 0

    def validate(self) -> tuple[bool, bool]:
        """Eval loss on the whole held-out split; (improved on the best, early stopping says stop)."""
        pos, data, started = self.pos, self.data.eval, time.perf_counter()
        loss = self.runner.eval_loss(data)
        es = self.recipe.training.early_stopping
        min_delta = es.min_delta if es is not None else 0.0
        improved = pos.best_loss is None or loss < pos.best_loss - min_delta
        if improved:
            pos.best_loss, pos.best_step, pos.evals_since_best = loss, pos.step, 0
        else:
            pos.evals_since_best += 1
        seconds = time.perf_counter() - started
        self.metrics.write({"event": "eval", "step": pos.step, "eval_loss": loss, "best_step": pos.best_step,
                            "eval_blocks": len(data), "seconds": seconds, **self.runner.objective.eval_report()})
        self.log(f"eval step {pos.step}: loss {loss:.4f} on {len(data)} blocks in {seconds:.2f}s"
                 f"{' (best)' if improved else f', best {pos.best_loss:.4f} at step {pos.best_step}'}")
        return improved and es is not None, es is not None and pos.evals_since_best >= es.patience

    def save(self, best: bool, finished: bool) -> None:
        """Every rank: write and publish the checkpoint of this step; under `auto` the first write sets the
        interval (all ranks agree on the slowest write and step)."""
        self.pos.finished = finished
        m, step = self.manager, self.pos.step
        m.save(self.runner.engine, step, self.pos.client_state(),
               {**_meta(self.recipe, self.pos, self.runner.layout), "best": best},
               {"loss_sum": self.loss_sum, "loss_count": self.loss_count})
        path = self.recipe.checkpoint_path / ckpt.tag_for(step)
        self.metrics.write({"event": "checkpoint", "step": step, "seconds": m.last_save_seconds,
                            "bytes": m.last_save_bytes, "best": best, "path": str(path)})
        if self.sync is not None:
            self.sync.submit(path)
        if self.schedule.provisional:
            self.schedule.measured(all_reduce_max(m.last_save_seconds), all_reduce_max(self.step_seconds), self.log)
        self.log(f"checkpoint step {step} published in {m.last_save_seconds:.2f}s ({m.last_save_bytes / 1e6:.1f} MB)")

    def roll_back(self, loss: float) -> bool:
        """The step diverged: reload the last checkpoint and mark the offending global batch to be skipped (the
        steps in between replay exactly); False when the guard has no rollback left or nothing to go back to."""
        t, pos = self.recipe.training, self.pos
        if pos.rollbacks >= t.guard.max_rollbacks or ckpt.find_latest(self.recipe.checkpoint_path) is None:
            self.log(f"step {pos.step + 1}: loss {loss} diverged and cannot be rolled back "
                     f"(rollbacks {pos.rollbacks}/{t.guard.max_rollbacks}); stopping")
            self.metrics.write({"event": "guard", "step": pos.step + 1, "action": "gave_up"})
            return False
        bad = [pos.samples, pos.samples + t.global_batch_size]
        resume = self.manager.find(self.rank.world_size, _layout_meta(self.runner.layout))
        assert resume is not None and not resume.reshaped
        restored = Position.restore(self.manager.load(self.runner.engine, resume), t.global_batch_size)
        restored.skips, restored.rollbacks = [*pos.skips, bad], pos.rollbacks + 1
        self.log(f"step {pos.step + 1}: loss {loss} tripped the divergence guard; rolled back to step "
                 f"{restored.step} and skipping samples {bad[0]}..{bad[1] - 1} (rollback {restored.rollbacks})")
        self.metrics.write({"event": "guard", "step": pos.step + 1, "loss": loss if np.isfinite(loss) else str(loss),
                            "action": "rollback", "to_step": restored.step, "skipped_samples": bad,
                            "rollbacks": restored.rollbacks})
        self.pos, self.loss_sum, self.loss_count = restored, 0.0, 0
        return True

    def restore_best(self) -> None:
        """Load the best-validated checkpoint's weights for the export (keeping the guard's counts)."""
        best = ckpt.Checkpoint(self.recipe.checkpoint_path / ckpt.tag_for(self.pos.best_step), {})
        best.meta = ckpt.verify(best.path, self.recipe.checkpoint.verify_checksums)
        rollbacks, skips = self.pos.rollbacks, self.pos.skips
        self.pos = Position.restore(self.manager.load(self.runner.engine, ckpt.Resume(best, False, False)),
                                    self.recipe.training.global_batch_size)
        self.pos.rollbacks, self.pos.skips = rollbacks, skips

    def close(self, code: int) -> int:
        """Stop the progress bar and background threads; a stopped or failed run tells MLflow its outcome."""
        self.progress.stop()
        if self.watcher is not None:
            self.watcher.stop()
        if self.sync is not None:
            self.sync.close()
        if code != FINISHED:
            self.metrics.close("FAILED" if code == DIVERGED else "KILLED", {"step": self.pos.step})
        return code


# --- the pieces the loop calls -----------------------------------------------------------------

def _quiet_libraries() -> None:
    """Keep the console to our own lines: DeepSpeed's info and torch's deprecation chatter off."""
    import logging
    import warnings

    from deepspeed.utils import logger as ds_logger
    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    ds_logger.setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _logger(rank: RankInfo):
    def log(message: str) -> None:
        if rank.is_main:
            print(f"[privlm] {message}", flush=True)
    return log


def _tracker(recipe: Recipe, rank: RankInfo, resumed_step: int | None, params: int) -> Any:
    """Rank 0's MLflow tracker (None when tracking is off or on other ranks)."""
    if not (rank.is_main and recipe.registry.tracking):
        return None
    from mlops.tracking import RunTracker

    tracker = RunTracker(recipe)
    tracker.start(resumed_step, {"privlm.git_commit": _git_commit() or "unknown",
                                 "privlm.data_fingerprint": _data_fingerprint(recipe) or "unknown",
                                 "privlm.world_size": str(rank.world_size), "privlm.device": rank.device,
                                 "privlm.params": str(params)})
    return tracker


def _already_exported(run: RunDir, pos: Position) -> bool:
    """A finished run whose export matches its last checkpoint (a rerun must not re-export)."""
    lineage = run.lineage()
    return lineage is not None and lineage.get("step") in (pos.step, pos.best_step)


def _resume(manager: ckpt.CheckpointManager, runner: Any, resume: Any, global_batch: int,
            log: Any) -> tuple[Position, dict[str, Any], float]:
    """(position, this rank's loop state, seconds) after loading `resume`; a fresh start without one."""
    started = time.perf_counter()
    if resume is None:
        return Position(), {}, 0.0
    state = manager.load(runner.engine, resume)
    pos = Position.restore(state, global_batch)
    how = f", reshaped from {resume.checkpoint.meta['world_size']} ranks" if resume.reshaped else ""
    seconds = time.perf_counter() - started
    log(f"resumed from {resume.checkpoint.path} at step {pos.step} ({pos.samples:,} samples, {pos.tokens:,} "
        f"tokens seen{how}) in {seconds:.2f}s")
    return pos, state["rank_state"], seconds


def _is_lora(recipe: Recipe) -> bool:
    return recipe.finetune is not None and recipe.finetune.method == "lora"


def _check_data(recipe: Recipe, data: Any) -> None:
    if data.block_size != recipe.training.sequence_length:
        raise SystemExit(
            f"{recipe.data_path} holds blocks of {data.block_size} tokens but training.sequence_length="
            f"{recipe.training.sequence_length}; rerun `privlm data prepare` for this recipe"
        )
    if data.vocab_size > recipe.model.vocab_size:
        raise SystemExit(f"the tokenizer has {data.vocab_size} tokens but model.vocab_size={recipe.model.vocab_size}")
    if len(data) < recipe.training.global_batch_size:
        raise SystemExit(f"{recipe.data_path} has {len(data)} blocks, fewer than one global batch")


def _build(recipe: Recipe, rank: RankInfo, eos_id: int) -> tuple[Any, int]:
    """The model to train: fresh, or the fine-tuning base (full or with LoRA adapters)."""
    from jobs.train.model import build_model, load_pretrained

    ft = recipe.finetune
    if ft is None or ft.base is None:  # pretraining, or a distillation student of the recipe's shape
        model = build_model(recipe.model, recipe.training.seed, eos_id)
    elif (Path(ft.base) / "config.json").is_file():
        model = load_pretrained(ft.base)
    else:
        model = build_model(recipe.model, recipe.training.seed, eos_id)
        model.load_state_dict(ckpt.load_module_weights(Path(ft.base)))
    base_params = sum(p.numel() for p in model.parameters())
    if recipe.training.activation_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if _is_lora(recipe):
        from jobs.train.lora import apply_lora

        if recipe.training.activation_checkpointing:
            model.enable_input_require_grads()
        import torch

        torch.manual_seed(recipe.training.seed)
        model = apply_lora(model, recipe.finetune.lora)
    return model, base_params


def _restore_and_sync(recipe: Recipe, rank: RankInfo) -> Any:
    """With checkpoint.s3_uri: restore from S3 when the local copy is missing; rank 0 syncs new ones."""
    uri = recipe.checkpoint.s3_uri
    if uri is None:
        return None
    from jobs.launch.storage import CheckpointSync, restore_latest, s3_client
    from jobs.train.distributed import barrier

    if rank.is_main and ckpt.find_latest(recipe.checkpoint_path) is None:
        restored = restore_latest(recipe.checkpoint_path, uri, s3_client(recipe.checkpoint.s3_endpoint_url))
        if restored is not None:
            print(f"[privlm] restored {restored.name} from {uri}", flush=True)
    barrier()
    return CheckpointSync(uri, recipe.checkpoint.s3_endpoint_url) if rank.is_main else None


def _spot_watcher(recipe: Recipe, rank: RankInfo, stop: StopRequest) -> Any:
    """One watcher per node: a spot notice becomes a SIGUSR2-like stop request (checkpoint, exit, requeue)."""
    if not recipe.spot.watch or rank.local_rank != 0:
        return None
    from jobs.launch.spot import SpotWatcher

    def on_notice(notice: Any) -> None:
        print(f"[privlm] spot {notice.kind} notice {notice.detail}: checkpointing and stopping", flush=True)
        stop.request(REQUEUE_SIGNAL)

    return SpotWatcher(on_notice, recipe.spot.metadata_url, recipe.spot.poll_s, recipe.spot.include_rebalance).start()


def _layout_meta(layout: Any) -> dict[str, int]:
    return {"tensor": layout.tensor, "pipeline": layout.pipeline, "data": layout.data}


def _meta(recipe: Recipe, pos: Position, layout: Any) -> dict[str, Any]:
    return {"recipe": recipe.name, "recipe_fingerprint": recipe.fingerprint(), "tokens": pos.tokens,
            "samples": pos.samples, "data_fingerprint": _data_fingerprint(recipe), "layout": _layout_meta(layout),
            "zero_stage": recipe.deepspeed.zero_stage, "lora": _is_lora(recipe), "git_commit": _git_commit()}


def _eval_split(recipe: Recipe) -> Any:
    """The held-out split, or None when the data has none."""
    from jobs.data.pack import PackedDataset

    try:
        data = PackedDataset(recipe.data_path, "eval")
    except FileNotFoundError:
        return None
    return data if len(data) else None


class _Guard:
    """Judges each step's loss: non-finite, or (with spike_factor) above that multiple of the running mean."""

    def __init__(self, recipe: Recipe) -> None:
        self.config = recipe.training.guard
        self.mean: float | None = None
        self.seen = 0

    def judge(self, loss: float) -> bool:
        if not self.config.enabled:
            return False
        if not np.isfinite(loss):
            return True
        c = self.config
        if c.spike_factor is not None and self.mean is not None and self.seen >= c.warmup_steps \
                and loss > c.spike_factor * self.mean:
            return True
        self.mean = loss if self.mean is None else 0.9 * self.mean + 0.1 * loss
        self.seen += 1
        return False


class _SampleLog:
    """training.record_samples: each rank appends the block ids of every step it trains to
    run_dir/samples/rank-NNNNN.jsonl with its data-parallel rank and the launch (`attempt`): a step that
    was replayed after a resume counts from the latest attempt only."""

    def __init__(self, recipe: Recipe, rank: RankInfo, layout: Any) -> None:
        folder = RunDir.of(recipe).samples_dir
        folder.mkdir(parents=True, exist_ok=True)
        self.data_rank = layout.data_rank
        self.attempt = all_reduce_max(time.time())  # one id per launch, the same on every rank
        self._fh = open(folder / f"rank-{rank.rank:05d}.jsonl", "a", buffering=1)  # noqa: SIM115 - run-long

    def write(self, step: int, micro: list[np.ndarray]) -> None:
        ids = [int(i) for m in micro for i in m]
        self._fh.write(json.dumps({"attempt": self.attempt, "step": step, "data_rank": self.data_rank,
                                   "ids": ids}) + "\n")


def _method_eval(recipe: Recipe, runner: Any, data: TrainData) -> dict[str, Any]:
    """What the method is judged on besides eval loss: DPO's held-out preference accuracy and reward margin
    (from the final validation pass), the distillation teacher's loss on the same split."""
    ft = recipe.finetune
    if ft is None or data.eval is None:
        return {}
    if ft.method == "dpo":
        return runner.objective.eval_report()
    if ft.method == "distill":
        teacher_loss = runner.eval_loss(data.eval, teacher=True)
        return {"teacher_eval_loss": teacher_loss, "teacher_eval_perplexity": float(np.exp(teacher_loss)),
                "teacher": runner.objective.source}
    return {}


def _export(recipe: Recipe, runner: Any, rank: RankInfo, pos: Position, layout: Any, eval_loss: float | None,
            method_eval: dict[str, Any]) -> None:
    from jobs.train.export import export_full, export_lora

    ft = recipe.finetune
    lineage = {**_meta(recipe, pos, layout), "step": pos.step, "eval_loss": eval_loss, **method_eval,
               "method": ft.method if ft else "pretrain", "data_format": recipe.data.format,
               "base_model": ft.base if ft else None,
               "reference_model": (ft.dpo.reference or ft.base) if ft and ft.method == "dpo" else None}
    tokenizer_dir, run = recipe.data_path / "tokenizer", RunDir.of(recipe)
    out = run.model_dir
    if _is_lora(recipe):
        export_lora(runner.engine.module, rank, recipe.finetune.base, out, run.adapter_dir,
                    tokenizer_dir, lineage)
    else:
        export_full(runner.full_model, runner.state_dict(), rank, out, tokenizer_dir, lineage)


def _data_fingerprint(recipe: Recipe) -> str | None:
    manifest = recipe.data_path / "manifest.json"
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text()).get("fingerprint")


@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of one rank: `python -m jobs.train.engine RECIPE.yaml`."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m jobs.train.engine RECIPE.yaml (with RANK, WORLD_SIZE, MASTER_ADDR/PORT set)")
        return 2
    return train(load_recipe(args[0]))


if __name__ == "__main__":
    sys.exit(main())
