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
from pathlib import Path
from typing import Any

import numpy as np

from jobs.recipe import Recipe, load_recipe
from jobs.train import checkpoint as ckpt
from jobs.train.distributed import RankInfo, all_reduce_max, all_reduce_mean, init_distributed
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

    def agreed(self) -> int:
        """The strongest stop signal any rank has seen (a collective: every rank calls it each step)."""
        return int(BY_PRECEDENCE[int(all_reduce_max(PRECEDENCE[self.signum]))])


def train(recipe: Recipe) -> int:
    """Train one rank to the end (exit 0) or to a stop signal (checkpoint, exit 128+signal)."""
    t_start = time.perf_counter()
    stop = StopRequest()
    rank = init_distributed(recipe.training.threads_per_process)
    _quiet_libraries()
    log = _logger(rank)
    t = recipe.training

    from jobs.data.pack import PackedDataset, ResumableSampler

    train_data = PackedDataset(recipe.data_path, "train")
    _check_data(recipe, train_data)
    model, total = _build(recipe, rank, train_data.eos_id)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    engine = _initialize(recipe, rank, model)
    log(f"model: {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable), "
        f"ZeRO-{recipe.deepspeed.zero_stage} {recipe.deepspeed.precision}, {rank.world_size} ranks on {rank.device}, "
        f"gradient accumulation {t.gradient_accumulation_steps}")

    manager = ckpt.CheckpointManager(recipe.checkpoint_path, rank, keep=recipe.checkpoint.keep,
                                     checksums=recipe.checkpoint.verify_checksums,
                                     exclude_frozen=_is_lora(recipe))
    step, tokens_seen = 0, 0
    sync = _restore_and_sync(recipe, rank)
    t_load = time.perf_counter()
    try:
        resumed = manager.load(engine, _data_fingerprint(recipe))
    except ckpt.CheckpointError as refused:  # every rank sees the same checkpoint and refuses alike
        log(f"cannot resume: {refused}")
        return 2
    load_seconds = time.perf_counter() - t_load
    if resumed is not None:
        found, state = resumed
        step, tokens_seen = int(state["step"]), int(state["tokens"])
        log(f"resumed from {found.path} at step {step} ({tokens_seen:,} tokens seen) in {load_seconds:.2f}s")
    if step >= t.total_steps and _already_exported(recipe, step):
        log(f"already trained to step {step}; model in {recipe.run_path / 'model'} (nothing to do)")
        return 0
    interval, interval_is_provisional = _checkpoint_interval(recipe), recipe.checkpoint.interval == "auto"
    watcher = _spot_watcher(recipe, rank, stop)
    step_started = time.perf_counter()

    from jobs.train.model import flops_per_token

    peak, peak_source = peak_flops(rank.device, recipe.deepspeed.precision)
    meter = ThroughputMeter(flops_per_token(recipe.model, total, t.sequence_length), peak * rank.world_size)
    tracker = _tracker(recipe, rank, step if resumed is not None else None, total)
    metrics = MetricsWriter(recipe.run_path / "metrics.jsonl", enabled=rank.is_main, tracker=tracker)
    metrics.write({"event": "start", "step": step, "resumed": resumed is not None, "load_seconds": load_seconds,
                   "peak_flops_per_rank": peak,
                   "peak_source": peak_source, "world_size": rank.world_size, "params": total})
    progress = StepProgress(t.total_steps, step, enabled=rank.is_main)
    log = progress.log if rank.is_main else log
    sampler = ResumableSampler(len(train_data), t.seed)
    per_micro = t.micro_batch_size * rank.world_size
    # the running loss of the current log interval: restored, so a resume inside an interval logs the same mean
    loop = state.get("rank_state", {}) if resumed is not None else {}
    loss_sum, loss_count = float(loop.get("loss_sum", 0.0)), int(loop.get("loss_count", 0))

    while step < t.total_steps:
        logging_step = (step + 1) % t.log_every == 0 or step + 1 == t.total_steps
        for micro in range(t.gradient_accumulation_steps):
            start = step * t.global_batch_size + micro * per_micro + rank.rank * t.micro_batch_size
            batch = _to_device(train_data.get_blocks(sampler.indices(start, t.micro_batch_size)), rank)
            loss = engine(input_ids=batch, labels=batch).loss
            engine.backward(loss)
            if logging_step and micro == t.gradient_accumulation_steps - 1:
                grad_norm = _grad_norm_before_step(engine)
            engine.step()
            loss_sum += loss.item()
            loss_count += 1
        step += 1
        step_seconds, step_started = time.perf_counter() - step_started, time.perf_counter()
        tokens_seen += t.tokens_per_step
        meter.add(t.tokens_per_step)
        progress.advance(step)

        if logging_step:
            mean_loss, = all_reduce_mean([loss_sum / loss_count])
            record = {"step": step, "loss": mean_loss, "lr": engine.get_lr()[0], "tokens": tokens_seen,
                      "grad_norm": _grad_norm_after_step(engine, grad_norm), **meter.report()}
            metrics.write(record)
            log(format_step(record, t.total_steps))
            progress.advance(step, f"loss {record['loss']:.3f}")
            loss_sum, loss_count = 0.0, 0

        signum = stop.agreed()
        if step % interval == 0 or signum or step == t.total_steps:
            manager.save(engine, step, {"step": step, "tokens": tokens_seen},
                         _meta(recipe, step, tokens_seen), {"loss_sum": loss_sum, "loss_count": loss_count})
            metrics.write({"event": "checkpoint", "step": step, "seconds": manager.last_save_seconds,
                           "bytes": manager.last_save_bytes})
            if tracker is not None:
                tracker.checkpoint(step, recipe.checkpoint_path / ckpt.tag_for(step), manager.last_save_bytes)
            if sync is not None:
                sync.submit(recipe.checkpoint_path / ckpt.tag_for(step))
            if recipe.checkpoint.interval == "auto" and interval_is_provisional:
                # every rank must pick the same interval: agree on the slowest write and step
                interval = _young_daly_steps(recipe, all_reduce_max(manager.last_save_seconds),
                                             all_reduce_max(step_seconds), log)
                interval_is_provisional = False
            log(f"checkpoint step {step} published in {manager.last_save_seconds:.2f}s "
                f"({manager.last_save_bytes / 1e6:.1f} MB)")
        if signum:
            log(f"stopping on {signal.Signals(signum).name} after step {step}; rerun the same command to resume")
            progress.stop()
            metrics.write({"event": "stopped", "step": step, "signal": signum})
            metrics.close("KILLED", {"step": step})
            _finish_background(sync, watcher)
            return 128 + signum

    progress.stop()
    _finish_background(sync, watcher)
    eval_loss = _evaluate(recipe, engine, rank)
    _export(recipe, engine, rank, step, tokens_seen, eval_loss)
    summary = {"event": "finished", "step": step, "tokens": tokens_seen, "eval_loss": eval_loss,
               "eval_perplexity": float(np.exp(eval_loss)) if eval_loss is not None else None,
               "wall_seconds": time.perf_counter() - t_start, "model_dir": str(recipe.run_path / "model")}
    metrics.write(summary)
    metrics.close("FINISHED", {k: v for k, v in summary.items() if k != "event"})
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


def _already_exported(recipe: Recipe, step: int) -> bool:
    """A finished run whose export matches its last checkpoint (a rerun must not re-export)."""
    lineage = recipe.run_path / "model" / "privlm.json"
    return lineage.is_file() and json.loads(lineage.read_text()).get("step") == step


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


def _initialize(recipe: Recipe, rank: RankInfo, model: Any) -> Any:
    """deepspeed.initialize with weight decay on matrices only."""
    import deepspeed

    from jobs.train.ds_config import deepspeed_config

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2]},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups,
                                           config=deepspeed_config(recipe, rank.world_size))
    return engine


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


def _to_device(blocks: np.ndarray, rank: RankInfo) -> Any:
    import torch

    tensor = torch.from_numpy(blocks)
    return tensor.to(f"cuda:{rank.local_rank}") if rank.device == "cuda" else tensor


def _grad_norm_before_step(engine: Any) -> float | None:
    """ZeRO-0 keeps no global norm: compute it from the averaged gradients before the optimizer step."""
    if engine.zero_optimization_stage() != 0:
        return None
    import torch

    norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else None


def _grad_norm_after_step(engine: Any, before: float | None) -> float:
    """The pre-clipping global gradient norm of the last step."""
    norm = engine.get_global_grad_norm() if before is None else before
    return float(norm) if norm is not None else float("nan")


def _meta(recipe: Recipe, step: int, tokens: int) -> dict[str, Any]:
    return {"recipe": recipe.name, "recipe_fingerprint": recipe.fingerprint(), "tokens": tokens,
            "data_fingerprint": _data_fingerprint(recipe),
            "zero_stage": recipe.deepspeed.zero_stage, "lora": _is_lora(recipe), "git_commit": _git_commit()}


def _evaluate(recipe: Recipe, engine: Any, rank: RankInfo, max_batches: int = 8) -> float | None:
    """Mean loss on the held-out split, each rank taking its share of the blocks."""
    import torch

    from jobs.data.pack import PackedDataset

    try:
        data = PackedDataset(recipe.data_path, "eval")
    except FileNotFoundError:
        return None
    if len(data) == 0:
        return None
    mb = recipe.training.micro_batch_size
    ids = np.arange(len(data))[rank.rank::rank.world_size][: max_batches * mb]
    engine.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, max(len(ids), 1), mb):
            chunk = ids[i:i + mb] if len(ids) else np.arange(min(mb, len(data)))
            batch = _to_device(data.get_blocks(chunk), rank)
            losses.append(engine(input_ids=batch, labels=batch).loss.item())
    engine.train()
    mean, = all_reduce_mean([float(np.mean(losses))])
    return mean


def _export(recipe: Recipe, engine: Any, rank: RankInfo, step: int, tokens: int, eval_loss: float | None) -> None:
    from jobs.train.export import export_full, export_lora

    lineage = {**_meta(recipe, step, tokens), "step": step, "eval_loss": eval_loss,
               "base_model": recipe.finetune.base if recipe.finetune else None}
    tokenizer_dir = recipe.data_path / "tokenizer"
    out = recipe.run_path / "model"
    if _is_lora(recipe):
        export_lora(engine.module, rank, recipe.finetune.base, out, recipe.run_path / "adapter",
                    tokenizer_dir, lineage)
    else:
        export_full(engine.module, rank, out, tokenizer_dir, lineage)


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
