"""Hardware planning: per-GPU memory for training under ZeRO 0-3 (offload, activation checkpointing) with
tensor x pipeline x data parallelism, the smallest catalog configurations that fit with their GPU-hours,
time and cost, and serving memory per replica."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from cost.workload import gpu_hours, training_flops
from infra.hardware import gpus, instance_types

GIB = 1024**3


@dataclass(frozen=True)
class TrainShape:
    """What sets training memory: size, shape, batch, precision."""

    params: float
    layers: int
    hidden: int
    heads: int
    seq_len: int
    micro_batch: int
    vocab: int = 32000


def model_state_bytes(params: float, stage: int, gpus_: int, offload_optimizer: bool = False,
                      offload_params: bool = False) -> float:
    """Per-GPU bytes of model states in bf16 mixed precision, as DeepSpeed's own estimators count them:
    bf16 weights 2N, bf16 gradients 2N, and 16N of fp32 master weights, Adam m and v, and fp32 gradients.

    ZeRO-1 shards the 16N, ZeRO-2 also the gradients, ZeRO-3 also the weights (Rajbhandari et al. 2020);
    CPU offload moves the 16N (and ZeRO-2/3 gradients) to the host, and with offload_params the weights too.
    """
    weights, grads, optim = 2 * params, 2 * params, 16 * params
    if offload_optimizer:
        optim = 0.0
        if stage >= 2:
            grads = 0.0
    if stage >= 1:
        optim /= gpus_
    if stage >= 2:
        grads /= gpus_
    if stage >= 3:
        weights = 0.0 if offload_params else weights / gpus_
        grads = 0.0  # ZeRO-3 reduces straight into the fp32 partition
    return weights + grads + optim


def activation_bytes(shape: TrainShape, checkpointing: bool) -> float:
    """Per-GPU activations: 34·s·b·h bytes per layer in bf16 (Korthikanti et al. 2022, eq. 2, with fused/flash
    attention, which drops the 5·a·s²·b score term); with full activation checkpointing, each layer's input
    (2·s·b·h) plus one layer recomputed."""
    s, b, h, n = shape.seq_len, shape.micro_batch, shape.hidden, shape.layers
    per_layer = 34 * s * b * h
    logits = 4 * s * b * shape.vocab  # fp32 logits for the loss
    if checkpointing:
        return n * 2 * s * b * h + per_layer + logits
    return n * per_layer + logits


def train_memory_gib(shape: TrainShape, stage: int, gpus_: int, offload: bool, checkpointing: bool,
                     tensor: int = 1, pipeline: int = 1) -> float:
    """Per-GPU memory in GiB, with 10% for fragmentation and buffers, on `gpus_` GPUs split tensor x pipeline x
    data. Model states: the N/(T·P) parameters of one shard, ZeRO-partitioned over the D data ranks.
    Activations: tensor parallelism splits each layer's (Korthikanti et al. 2022 without sequence parallelism:
    the 10·s·b·h of norms and residuals stay whole, the 24·s·b·h of attention and MLP split); a pipeline stage
    holds L/P layers but, under 1F1B, up to P micro-batches in flight, so the first stage keeps them all."""
    data = gpus_ // (tensor * pipeline)
    states = model_state_bytes(shape.params / (tensor * pipeline), stage, data, offload, offload and stage == 3)
    s, b, h, n = shape.seq_len, shape.micro_batch, shape.hidden, shape.layers
    per_layer = s * b * h * (10 + 24 / tensor)
    logits = 4 * s * b * shape.vocab / tensor
    layers_here, in_flight = -(-n // pipeline), pipeline
    kept = 2 * s * b * h if checkpointing else per_layer  # per layer and micro-batch in flight
    acts = in_flight * layers_here * kept + (per_layer if checkpointing else 0.0)
    return 1.1 * (states + acts + logits) / GIB


def layouts(n_gpus: int, gpus_per_node: int, shape: TrainShape) -> list[tuple[int, int]]:
    """(tensor, pipeline) degrees the trainer accepts on `n_gpus` (jobs.recipe.parallel_problems): tensor
    within a node and dividing the heads, pipeline at most the layers, never both above 1; least split first."""
    out = [(1, 1)]
    for t in (2, 4, 8):
        if t <= gpus_per_node and n_gpus % t == 0 and shape.heads % t == 0:
            out.append((t, 1))
    for p in (2, 4, 8, 16):
        if p <= shape.layers and n_gpus % p == 0:
            out.append((1, p))
    return out


def smallest_fits(shape: TrainShape, tokens: float, mfu: float = 0.4, limit: int = 8) -> list[dict[str, Any]]:
    """For each catalog instance type, the fewest GPUs (whole nodes beyond one) that fit, cheapest first."""
    options = []
    for inst in instance_types().values():
        gpu = gpus().get(inst.gpu)
        if gpu is None:
            continue
        # instances are rented whole; CPU offload only when no node count up to 64 fits without it
        for nodes, offload in ((n, o) for o in (False, True) for n in (1, 2, 4, 8, 16, 32, 64)):
            n_gpus = nodes * inst.gpus
            fit = _best_setting(shape, n_gpus, inst.gpus, inst.gpu_memory_gib, offload)
            if fit is None:
                continue
            total_hours = gpu_hours(training_flops(shape.params, tokens), gpu.bf16_dense_tflops, mfu)
            hours = total_hours / n_gpus
            options.append({"instance_type": inst.instance_type, "gpu": inst.gpu, "gpus": n_gpus, "nodes": nodes,
                            **fit, "gpu_hours": total_hours, "days": hours / 24,
                            "on_demand_usd": hours * nodes * inst.on_demand_usd_per_hour})
            break
    return sorted(options, key=lambda o: o["on_demand_usd"])[:limit]


def _best_setting(shape: TrainShape, n_gpus: int, gpus_per_node: int, gpu_gib: float,
                  allow_offload: bool = True) -> dict[str, Any] | None:
    """The least intrusive setting that fits: data parallelism before tensor before pipeline, then the lowest
    ZeRO stage, no offload, no recomputation; only ZeRO stages DeepSpeed runs with that layout."""
    from jobs.recipe import PIPELINE_ZERO, TENSOR_ZERO

    for tensor, pipeline in layouts(n_gpus, gpus_per_node, shape):
        allowed = PIPELINE_ZERO if pipeline > 1 else TENSOR_ZERO if tensor > 1 else (0, 1, 2, 3)
        for checkpointing in (False, True):
            for offload in (False, True) if allow_offload else (False,):
                if offload and pipeline > 1:
                    continue
                for stage in (s for s in allowed if not offload or s >= 1):  # offload needs ZeRO 1+
                    gib = train_memory_gib(shape, stage, n_gpus, offload, checkpointing, tensor, pipeline)
                    if gib <= gpu_gib:
                        return {"zero_stage": stage, "offload": offload, "activation_checkpointing": checkpointing,
                                "tensor": tensor, "pipeline": pipeline, "data": n_gpus // (tensor * pipeline),
                                "gib_per_gpu": gib}
    return None


def serving_memory_gib(params: float, layers: int, kv_heads: int, head_dim: int, context: int, batch: int,
                       quantization: str = "bf16") -> dict[str, float]:
    """Weights at a quantization plus the bf16 KV cache (2 x layers x kv_heads x head_dim x context x batch)."""
    bytes_per_param = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}[quantization]
    weights = params * bytes_per_param
    kv = 2 * layers * kv_heads * head_dim * context * batch * 2
    return {"weights_gib": weights / GIB, "kv_cache_gib": kv / GIB, "total_gib": 1.1 * (weights + kv) / GIB}


def replicas_needed(params: float, requests_per_s: float, tokens_per_request: float, peak_tflops: float,
                    serve_mfu: float = 0.1, latency_target_s: float | None = None, batch: int = 16) -> dict[str, Any]:
    """Replicas for a request rate: aggregate tokens/s over what one replica generates at `serve_mfu`."""
    replica_tps = peak_tflops * 1e12 * serve_mfu / (2 * params)
    replicas = max(1, math.ceil(requests_per_s * tokens_per_request / replica_tps))
    latency = tokens_per_request / (replica_tps / batch)
    out = {"replica_tokens_per_s": replica_tps, "replicas": replicas, "latency_s_at_batch": latency}
    if latency_target_s is not None and latency > latency_target_s:
        out["warning"] = (f"at batch {batch} a request takes {latency:.1f}s > target {latency_target_s}s: "
                          "lower the batch or add replicas")
    return out
