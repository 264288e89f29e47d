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

from jobs.recipe import Recipe, load_recipe
from jobs.train import checkpoint as ckpt
from jobs.train.distributed import RankInfo, all_reduce_max, all_reduce_max_many, all_reduce_mean, init_distributed
from jobs.train.metrics import MetricsWriter, StepProgress, ThroughputMeter, format_step, peak_flops

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


# When several stop signals arrive (Slurm preemption: USR2 then TERM; submitit's _interrupt: TERM then USR2),
# the one asking for a requeue wins, so every rank agrees on it whatever order each saw them in.
PRECEDENCE = {0: 0, signal.SIGINT: 1, signal.SIGTERM: 2, signal.SIGUSR1: 3, signal.SIGUSR2: 4}
BY_PRECEDENCE = {v: k for k, v in PRECEDENCE.items()}


class StopRequest:
    """Remembers the strongest stop signal; the loop acts on it at the next step boundary."""

    def __init__(self) -> None:
        self.signum = 0
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, _frame: object) -> None:
        if PRECEDENCE[signum] >= PRECEDENCE[self.signum]:
            self.signum = signum

    def agreed_with(self, bad: bool) -> tuple[int, bool]:
        """(strongest stop signal any rank has seen, whether any rank's step diverged): one collective that
        every rank calls each step."""
        precedence, diverged = all_reduce_max_many([PRECEDENCE[self.signum], float(bad)])
        return int(BY_PRECEDENCE[int(precedence)]), diverged > 0


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
    divergence guard gives up (exit 3)."""
    t_start = time.perf_counter()
    stop = StopRequest()
    rank = init_distributed(recipe.training.threads_per_process)
    _quiet_libraries()
    log = _logger(rank)
    t = recipe.training

    from jobs.data.pack import PackedDataset, ResumableSampler
    from jobs.train.parallel import Layout, Runner

    train_data = PackedDataset(recipe.data_path, "train")
    eval_data = _eval_split(recipe)
    _check_data(recipe, train_data)
    layout = Layout.of(recipe, rank)
    manager = ckpt.CheckpointManager(recipe.checkpoint_path, rank, keep=recipe.checkpoint.keep,
                                     checksums=recipe.checkpoint.verify_checksums, exclude_frozen=_is_lora(recipe))
    sync = _restore_and_sync(recipe, rank)
    try:  # every rank sees the same checkpoint and refuses alike
        resume = manager.find(rank.world_size, _layout_meta(layout), _data_fingerprint(recipe))
    except ckpt.CheckpointError as refused:
        log(f"cannot resume: {refused}")
        return 2
    model, total = _build(recipe, rank, train_data.eos_id)
    runner = Runner(recipe, rank, model, load_universal=resume is not None and resume.universal)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ga = t.gradient_accumulation(layout.data)
    log(f"model: {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable), "
        f"ZeRO-{recipe.deepspeed.zero_stage} {recipe.deepspeed.precision}, {rank.world_size} ranks on {rank.device} "
        f"({layout.describe()}), gradient accumulation {ga}")

    pos, loop, t_load = Position(), {}, time.perf_counter()
    if resume is not None:
        state = manager.load(runner.engine, resume)
        pos, loop = Position.restore(state, t.global_batch_size), state["rank_state"]
        how = f", reshaped from {resume.checkpoint.meta['world_size']} ranks" if resume.reshaped else ""
        log(f"resumed from {resume.checkpoint.path} at step {pos.step} ({pos.samples:,} samples, {pos.tokens:,} "
            f"tokens seen{how}) in {time.perf_counter() - t_load:.2f}s")
    load_seconds = time.perf_counter() - t_load
    if (pos.step >= t.total_steps or pos.finished) and _already_exported(recipe, pos):
        log(f"already trained to step {pos.step}; model in {recipe.run_path / 'model'} (nothing to do)")
        return 0
    interval, interval_is_provisional = _checkpoint_interval(recipe), recipe.checkpoint.interval == "auto"
    watcher = _spot_watcher(recipe, rank, stop)

    from jobs.train.model import flops_per_token

    peak, peak_source = peak_flops(rank.device, recipe.deepspeed.precision)
    meter = ThroughputMeter(flops_per_token(recipe.model, total, t.sequence_length), peak * rank.world_size)
    tracker = _tracker(recipe, rank, pos.step if resume is not None else None, total)
    metrics = MetricsWriter(recipe.run_path / "metrics.jsonl", enabled=rank.is_main, tracker=tracker)
    metrics.write({"event": "start", "step": pos.step, "samples": pos.samples, "resumed": resume is not None,
                   "reshaped": bool(resume and resume.reshaped), "load_seconds": load_seconds,
                   "peak_flops_per_rank": peak, "peak_source": peak_source, "world_size": rank.world_size,
                   "layout": _layout_meta(layout), "params": total})
    progress = StepProgress(t.total_steps, pos.step, enabled=rank.is_main)
    log = progress.log if rank.is_main else log
    sampler = ResumableSampler(len(train_data), t.seed)
    samples_log = _SampleLog(recipe, rank, layout) if t.record_samples else None
    guard = _Guard(recipe)
    # the running loss of the current log interval: restored, so a resume inside an interval logs the same mean
    loss_sum, loss_count = float(loop.get("loss_sum", 0.0)), int(loop.get("loss_count", 0))
    step_started, exit_code = time.perf_counter(), 0

    def save(best: bool = False) -> None:
        nonlocal interval, interval_is_provisional
        manager.save(runner.engine, pos.step, pos.client_state(), {**_meta(recipe, pos, layout), "best": best},
                     {"loss_sum": loss_sum, "loss_count": loss_count})
        metrics.write({"event": "checkpoint", "step": pos.step, "seconds": manager.last_save_seconds,
                       "bytes": manager.last_save_bytes, "best": best})
        if tracker is not None:
            tracker.checkpoint(pos.step, recipe.checkpoint_path / ckpt.tag_for(pos.step), manager.last_save_bytes)
        if sync is not None:
            sync.submit(recipe.checkpoint_path / ckpt.tag_for(pos.step))
        if interval_is_provisional:  # every rank must pick the same interval: agree on the slowest write and step
            interval = _young_daly_steps(recipe, all_reduce_max(manager.last_save_seconds),
                                         all_reduce_max(step_seconds), log)
            interval_is_provisional = False
        log(f"checkpoint step {pos.step} published in {manager.last_save_seconds:.2f}s "
            f"({manager.last_save_bytes / 1e6:.1f} MB)")

    while pos.step < t.total_steps:
        start = pos.next_batch_start(t.global_batch_size)
        micro = [sampler.indices(start + m * t.micro_batch_size * layout.data + layout.data_rank * t.micro_batch_size,
                                 t.micro_batch_size) for m in range(ga)]
        scale = float("nan") if ckpt.fault_at("bad_batch", start // t.global_batch_size + 1, rank) else 1.0
        step_loss, micro_count, norm_before = runner.train_step([train_data.get_blocks(i) for i in micro], scale)
        signum, bad = stop.agreed_with(guard.judge(step_loss / micro_count))
        if bad:
            if pos.rollbacks >= t.guard.max_rollbacks or ckpt.find_latest(recipe.checkpoint_path) is None:
                log(f"step {pos.step + 1}: loss {step_loss / micro_count} diverged and cannot be rolled back "
                    f"(rollbacks {pos.rollbacks}/{t.guard.max_rollbacks}); stopping")
                metrics.write({"event": "guard", "step": pos.step + 1, "action": "gave_up"})
                exit_code = 3
                break
            pos, loss_sum, loss_count = _roll_back(manager, runner, pos, t.global_batch_size, log, metrics,
                                                   step_loss / micro_count)
            continue
        if samples_log is not None:
            samples_log.write(pos.step + 1, micro)
        pos.step, pos.tokens, pos.samples = pos.step + 1, pos.tokens + t.tokens_per_step, start + t.global_batch_size
        loss_sum, loss_count = loss_sum + step_loss, loss_count + micro_count
        step_seconds, step_started = time.perf_counter() - step_started, time.perf_counter()
        meter.add(t.tokens_per_step)
        progress.advance(pos.step)

        if pos.step % t.log_every == 0 or pos.step == t.total_steps:
            mean_loss, = all_reduce_mean([loss_sum / loss_count])
            record = {"step": pos.step, "loss": mean_loss, "lr": runner.engine.get_lr()[0], "tokens": pos.tokens,
                      "samples": pos.samples, "grad_norm": runner.grad_norm(norm_before), **meter.report()}
            metrics.write(record)
            log(format_step(record, t.total_steps))
            progress.advance(pos.step, f"loss {record['loss']:.3f}")
            loss_sum, loss_count = 0.0, 0
        improved = stop_early = False
        if eval_data is not None and t.eval_every and pos.step % t.eval_every == 0:
            improved, stop_early = _validate(recipe, runner, eval_data, pos, metrics, log)
        if pos.step % interval == 0 or signum or pos.step == t.total_steps or improved or stop_early:
            pos.finished = stop_early or pos.step == t.total_steps
            save(best=improved)
        if signum:
            log(f"stopping on {signal.Signals(signum).name} after step {pos.step}; rerun the same command to resume")
            progress.stop()
            metrics.write({"event": "stopped", "step": pos.step, "signal": signum})
            metrics.close("KILLED", {"step": pos.step})
            _finish_background(sync, watcher)
            return 128 + signum
        if stop_early:
            log(f"early stopping at step {pos.step}: no improvement for {pos.evals_since_best} evaluations; "
                f"best eval loss {pos.best_loss:.4f} at step {pos.best_step}")
            break

    progress.stop()
    _finish_background(sync, watcher)
    if exit_code:
        metrics.close("FAILED", {"step": pos.step})
        return exit_code
    final_step = pos.step
    if t.early_stopping is not None and pos.best_step not in (None, pos.step):  # export the best validated weights
        best = ckpt.Checkpoint(recipe.checkpoint_path / ckpt.tag_for(pos.best_step), {})
        best.meta = ckpt.verify(best.path, recipe.checkpoint.verify_checksums)
        rollbacks, skips = pos.rollbacks, pos.skips
        pos = Position.restore(manager.load(runner.engine, ckpt.Resume(best, False, False)), t.global_batch_size)
        pos.rollbacks, pos.skips = rollbacks, skips
    eval_loss = runner.eval_loss(eval_data) if eval_data is not None else None
    _export(recipe, runner, rank, pos, layout, eval_loss)
    summary = {"event": "finished", "step": final_step, "exported_step": pos.step, "tokens": pos.tokens,
               "samples": pos.samples, "eval_loss": eval_loss,
               "eval_perplexity": float(np.exp(eval_loss)) if eval_loss is not None else None,
               "best_step": pos.best_step, "early_stopped": final_step < t.total_steps,
               "guard_rollbacks": pos.rollbacks, "skipped_batches": len(pos.skips),
               "wall_seconds": time.perf_counter() - t_start, "model_dir": str(recipe.run_path / "model")}
    metrics.write(summary)
    metrics.close("FINISHED", {k: v for k, v in summary.items() if k not in ("event",) and v is not None})
    if rank.is_main:
        (recipe.run_path / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"done: model in {summary['model_dir']}, eval loss {eval_loss}")
    return 0


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


def _already_exported(recipe: Recipe, pos: Position) -> bool:
    """A finished run whose export matches its last checkpoint (a rerun must not re-export)."""
    lineage = recipe.run_path / "model" / "privlm.json"
    return lineage.is_file() and json.loads(lineage.read_text()).get("step") in (pos.step, pos.best_step)


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
    if ft is None:
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


def _checkpoint_interval(recipe: Recipe) -> int:
    """The fixed interval, or for `auto` a provisional first one that measures the write time."""
    interval = recipe.checkpoint.interval
    if interval == "auto":
        return max(1, min(10, recipe.training.total_steps // 10))
    return interval


def _young_daly_steps(recipe: Recipe, write_s: float, step_s: float, log: Any) -> int:
    """Young/Daly: checkpoint every sqrt(2·δ·MTBF) seconds, in steps; logged with its inputs."""
    from cost.workload import young_daly_interval

    mtbf = 3600.0 / recipe.checkpoint.interruptions_per_hour
    tau = young_daly_interval(write_s, mtbf)
    steps = max(1, round(tau / max(step_s, 1e-6)))
    log(f"checkpoint interval auto: {steps} steps = sqrt(2 x {write_s:.2f}s write x {mtbf:.0f}s MTBF) = "
        f"{tau:.0f}s at {step_s:.2f}s/step ({recipe.checkpoint.interruptions_per_hour}/h interruptions)")
    return steps


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
        stop.signum = signal.SIGUSR2

    return SpotWatcher(on_notice, recipe.spot.metadata_url, recipe.spot.poll_s, recipe.spot.include_rebalance).start()


def _finish_background(sync: Any, watcher: Any) -> None:
    if watcher is not None:
        watcher.stop()
    if sync is not None:
        sync.close()


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


def _roll_back(manager: ckpt.CheckpointManager, runner: Any, pos: Position, global_batch: int, log: Any,
               metrics: MetricsWriter, loss: float) -> tuple[Position, float, int]:
    """Reload the last checkpoint and mark the offending global batch to be skipped; the steps in between
    replay exactly. Returns the restored position and an empty log interval."""
    bad = [pos.samples, pos.samples + global_batch]
    resume = manager.find(manager.rank.world_size, {"tensor": runner.layout.tensor,
                                                   "pipeline": runner.layout.pipeline, "data": runner.layout.data})
    assert resume is not None and not resume.reshaped
    restored = Position.restore(manager.load(runner.engine, resume), global_batch)
    restored.skips = [*pos.skips, bad]
    restored.rollbacks = pos.rollbacks + 1
    log(f"step {pos.step + 1}: loss {loss} tripped the divergence guard; rolled back to step {restored.step} and "
        f"skipping samples {bad[0]}..{bad[1] - 1} (rollback {restored.rollbacks})")
    metrics.write({"event": "guard", "step": pos.step + 1, "loss": loss if np.isfinite(loss) else str(loss),
                   "action": "rollback", "to_step": restored.step, "skipped_samples": bad,
                   "rollbacks": restored.rollbacks})
    return restored, 0.0, 0


def _validate(recipe: Recipe, runner: Any, data: Any, pos: Position, metrics: MetricsWriter,
              log: Any) -> tuple[bool, bool]:
    """Eval loss on the whole held-out split; (improved on the best, early stopping says stop)."""
    started = time.perf_counter()
    loss = runner.eval_loss(data)
    es = recipe.training.early_stopping
    min_delta = es.min_delta if es is not None else 0.0
    improved = pos.best_loss is None or loss < pos.best_loss - min_delta
    if improved:
        pos.best_loss, pos.best_step, pos.evals_since_best = loss, pos.step, 0
    else:
        pos.evals_since_best += 1
    seconds = time.perf_counter() - started
    metrics.write({"event": "eval", "step": pos.step, "eval_loss": loss, "best_step": pos.best_step,
                   "eval_blocks": len(data), "seconds": seconds})
    log(f"eval step {pos.step}: loss {loss:.4f} on {len(data)} blocks in {seconds:.2f}s"
        f"{' (best)' if improved else f', best {pos.best_loss:.4f} at step {pos.best_step}'}")
    return improved and es is not None, es is not None and pos.evals_since_best >= es.patience


class _SampleLog:
    """training.record_samples: each rank appends the block ids of every step it trains to
    run_dir/samples/rank-NNNNN.jsonl with its data-parallel rank and the launch (`attempt`): a step that
    was replayed after a resume counts from the latest attempt only."""

    def __init__(self, recipe: Recipe, rank: RankInfo, layout: Any) -> None:
        folder = recipe.run_path / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        self.data_rank = layout.data_rank
        self.attempt = all_reduce_max(time.time())  # one id per launch, the same on every rank
        self._fh = open(folder / f"rank-{rank.rank:05d}.jsonl", "a", buffering=1)  # noqa: SIM115 - run-long

    def write(self, step: int, micro: list[np.ndarray]) -> None:
        ids = [int(i) for m in micro for i in m]
        self._fh.write(json.dumps({"attempt": self.attempt, "step": step, "data_rank": self.data_rank,
                                   "ids": ids}) + "\n")


def _export(recipe: Recipe, runner: Any, rank: RankInfo, pos: Position, layout: Any, eval_loss: float | None) -> None:
    from jobs.train.export import export_full, export_lora

    lineage = {**_meta(recipe, pos, layout), "step": pos.step, "eval_loss": eval_loss,
               "base_model": recipe.finetune.base if recipe.finetune else None}
    tokenizer_dir = recipe.data_path / "tokenizer"
    out = recipe.run_path / "model"
    if _is_lora(recipe):
        export_lora(runner.engine.module, rank, recipe.finetune.base, out, recipe.run_path / "adapter",
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
