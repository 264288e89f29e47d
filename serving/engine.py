"""What the endpoint serves and the vLLM deployments that generate it (Ray Serve LLM's `LLMServer`).

`resolve` turns the settings' model URI into pinned versions once per deploy: an alias becomes a
version; a LoRA adapter version is served on its base model; `quantization: SCHEME` swaps in the
version `privlm model quantize` made from it. Versions that share a base share one engine
deployment (several adapters on one base), named after that base so a rollout to a version that is
already warm (the challenger) reuses its replicas.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.serve.llm import LLMConfig, LLMServer

from serving.settings import Engine, ServeSettings

# For tokenizers without a chat template of their own (our pretrained models): role-tagged turns.
DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def chat_template(model_dir: str | Path) -> str | None:
    """DEFAULT_CHAT_TEMPLATE when the tokenizer in `model_dir` has no template, else None (vLLM uses its own)."""
    import json

    config = Path(model_dir) / "tokenizer_config.json"
    has = config.is_file() and json.loads(config.read_text()).get("chat_template")
    return None if has or (Path(model_dir) / "chat_template.jinja").is_file() else DEFAULT_CHAT_TEMPLATE


def quantization_of(model_dir: str | Path) -> dict[str, str] | None:
    """The quantization vLLM loads a directory with: `quantization_config` of its config.json (vLLM picks its
    kernels from it), as {"method", "format"}; None for an unquantized model."""
    import json

    config = Path(model_dir) / "config.json"
    quant = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
    if not quant:
        return None
    return {"method": str(quant.get("quant_method")), "format": str(quant.get("format"))}


class ServingError(ValueError):
    """A serving configuration that cannot be deployed; the message says why and what to do."""


@dataclass(frozen=True)
class Served:
    """One servable version: its label, the base vLLM loads, and the adapter applied on top, if any."""

    version: str                 # what clients see in x-privlm-model-version, e.g. served/v3
    base_label: str              # the base model version the engine loads
    base_dir: str
    adapter_dir: str | None = None
    chat_template: str | None = None  # set when the tokenizer has none of its own
    quality_baseline: float | None = None  # expected feedback score (tag privlm.quality_baseline)


    @property
    def deployment(self) -> str:
        return slug(self.base_label)

    @property
    def engine_model(self) -> str:
        """The model name the vLLM deployment answers to: the base, or the adapter's LoRA name."""
        return slug(self.version) if self.adapter_dir else self.deployment


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", label).strip("-")


def served_name(uri: str) -> str:
    """The `model` clients ask for: the registered name, or the directory name."""
    if uri.startswith("models:/"):
        return re.split(r"[@/]", uri.removeprefix("models:/"))[0]
    path = Path(uri).resolve()
    return path.parent.name if path.name == "model" else path.name  # runs/NAME/model -> NAME


def pin(uri: str, tracking_uri: str | None) -> str:
    """`models:/NAME@alias` -> `models:/NAME/N` (the alias is read once); other URIs unchanged."""
    if not uri.startswith("models:/") or "@" not in uri:
        return uri
    from mlops.registry import alias_version

    name, _, alias = uri.removeprefix("models:/").partition("@")
    return f"models:/{name}/{alias_version(name, alias, tracking_uri).version}"


def resolve(uri: str, settings: ServeSettings) -> Served:
    """The pinned version behind `uri`, with its base, adapter and quantization sorted out."""
    uri = pin(uri, settings.tracking_uri)
    if not uri.startswith("models:/"):
        return _resolve_dir(Path(uri), settings.quantization)
    from mlops.registry import get_version, local_model_dir

    name, _, version = uri.removeprefix("models:/").partition("/")
    mv = get_version(name, version, settings.tracking_uri)
    label = f"{name}/v{version}"
    adapter_of = mv.tags.get("privlm.adapter_of")
    base = adapter_of.split("/")[-1] if adapter_of else version
    base = _quantized(name, base, settings) if settings.quantization != "none" else base
    base_dir = local_model_dir(f"models:/{name}/{base}", settings.tracking_uri)
    adapter_dir = local_model_dir(uri, settings.tracking_uri) if adapter_of else None
    if adapter_of is None and base != version:
        label = f"{name}/v{base}"
    return Served(label, f"{name}/v{base}", str(base_dir), str(adapter_dir) if adapter_dir else None,
                  chat_template(base_dir), _float(mv.tags.get("privlm.quality_baseline")))


def _float(value: str | None) -> float | None:
    return None if value is None else float(value)


def _resolve_dir(path: Path, quantization: str) -> Served:
    if quantization != "none":
        raise ServingError(f"quantization={quantization!r} needs a registered model (models:/NAME@ALIAS): "
                           "quantized versions are made by `privlm model quantize`; a directory is served as is")
    if not (path / "config.json").is_file():
        raise ServingError(f"model_uri={str(path)!r} is neither models:/NAME@ALIAS nor a Hugging Face directory")
    stamp = hashlib.sha256(str(sorted((f.name, f.stat().st_mtime_ns) for f in path.iterdir())).encode()).hexdigest()
    label = f"{path.name}@{stamp[:8]}"
    return Served(label, label, str(path.resolve()), chat_template=chat_template(path))


def check_runs_here(served: Served, engine: Engine) -> None:
    """Refuse, before anything starts, a model vLLM's CPU attention cannot run (it supports a fixed set of
    head sizes; an unsupported one kills the engine at the first request)."""
    import json

    if engine.gpus_per_replica:
        return
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    config = json.loads((Path(served.base_dir) / "config.json").read_text())
    head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head not in sizes:
        raise ServingError(f"{served.base_label} has attention head size {head} (hidden_size / num_heads); vLLM's "
                           f"CPU build runs head sizes {sizes}: serve it on a GPU (engine.gpus_per_replica) or "
                           "train with a supported head size")


def check_quantization(settings: ServeSettings) -> None:
    """A scheme this kind of replica cannot run (vLLM 0.32, measured) is refused before anything starts."""
    if settings.quantization == "none":
        return
    from mlops.quantize import check_scheme

    engine = settings.engine
    dtype = engine.dtype if engine.dtype != "auto" else ("bfloat16" if engine.gpus_per_replica else "float32")
    check_scheme(settings.quantization, "cuda" if engine.gpus_per_replica else "cpu", dtype)


def _quantized(name: str, version: str, settings: ServeSettings) -> str:
    """The version quantized from `version` with the settings' scheme, checked to run on this device."""
    from mlops.tracking import client

    check_quantization(settings)
    found = client(settings.tracking_uri).search_model_versions(
        f"name = '{name}' and tags.`privlm.quantized_from` = '{name}/{version}' "
        f"and tags.`privlm.quant_scheme` = '{settings.quantization}'")
    if not found:
        raise ServingError(f"{name}/v{version} has no {settings.quantization} version: run `privlm model quantize "
                           f"{name} {version} --scheme {settings.quantization}`, or set quantization: none")
    return str(max(int(mv.version) for mv in found))


class AdapterLLMServer(LLMServer):
    """Ray Serve LLM's server with LoRA adapters loaded from local directories at start-up.

    Ray Serve LLM loads adapters only from cloud storage (s3://, gs://, abfss://) on first request;
    ours come from the MLflow registry (already on local or shared disk), so the replica registers
    them with vLLM before it reports ready: no request pays for loading an adapter.
    """

    async def __init__(self, llm_config: LLMConfig, *, adapters: dict[str, str] | None = None) -> None:
        self._adapters = dict(adapters or {})
        await super().__init__(llm_config)

    async def start(self) -> None:
        from ray.llm._internal.common.models import global_id_manager
        from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig

        await super().start()
        for name, path in self._adapters.items():
            await self.engine.resolve_lora(DiskMultiplexConfig(
                model_id=name, local_path=path, max_total_tokens=None,
                lora_assigned_int_id=global_id_manager.next()))


@dataclass
class EngineDeployment:
    """One vLLM deployment: a base model and the adapters served on it."""

    base: Served
    adapters: dict[str, str] = field(default_factory=dict)


def group(served: list[Served], engine: Engine) -> dict[str, EngineDeployment]:
    """Deployments by name (versions with one base share it), each checked to run on this kind of replica."""
    out: dict[str, EngineDeployment] = {}
    for s in served:
        if s.deployment not in out:
            check_runs_here(s, engine)
        dep = out.setdefault(s.deployment, EngineDeployment(s))
        if s.adapter_dir:
            dep.adapters[s.engine_model] = s.adapter_dir
    return out


def engine_kwargs(engine: Engine, adapters: int, chat_template: str | None = None) -> dict[str, Any]:
    """vLLM's engine (and frontend) arguments for one deployment."""
    kwargs: dict[str, Any] = {"dtype": "float32" if engine.dtype == "auto" and not engine.gpus_per_replica
                              else engine.dtype, "max_num_seqs": engine.max_num_seqs}
    if engine.max_model_len:
        kwargs["max_model_len"] = engine.max_model_len
    if engine.gpus_per_replica:
        kwargs.update(tensor_parallel_size=engine.gpus_per_replica,
                      gpu_memory_utilization=engine.gpu_memory_utilization)
    if chat_template:
        kwargs["chat_template"] = chat_template
    if adapters:
        kwargs.update(enable_lora=True, max_loras=adapters, max_lora_rank=engine.max_lora_rank)
    return {**kwargs, **engine.extra}


def llm_deployment(dep: EngineDeployment, settings: ServeSettings) -> Any:
    """The bound Ray Serve LLM deployment for one base model (CPU bundles here, GPU bundles on clusters)."""
    from ray.serve.llm import build_llm_deployment

    engine = settings.engine
    bundle = {"CPU": engine.cpus_per_replica}
    bundles = [{**bundle, "GPU": 1}] * engine.gpus_per_replica if engine.gpus_per_replica else [bundle]
    deployment: dict[str, Any] = {"max_ongoing_requests": settings.max_ongoing_requests,
                                  "max_queued_requests": settings.max_queued_requests}
    if settings.min_replicas is not None:
        deployment["autoscaling_config"] = {"min_replicas": settings.min_replicas,
                                            "max_replicas": settings.max_replicas}
    else:
        deployment["num_replicas"] = settings.num_replicas
    env = {"VLLM_CPU_KVCACHE_SPACE": str(engine.kv_cache_gib)} if not engine.gpus_per_replica else {}
    config = LLMConfig(model_loading_config={"model_id": dep.base.deployment, "model_source": dep.base.base_dir},
                       engine_kwargs=engine_kwargs(engine, len(dep.adapters), dep.base.chat_template),
                       placement_group_config={"bundles": bundles}, deployment_config=deployment,
                       runtime_env={"env_vars": env})
    return build_llm_deployment(config, name_prefix="", deployment_cls=AdapterLLMServer,
                                bind_kwargs={"adapters": dep.adapters},
                                override_serve_options={"name": dep.base.deployment})
