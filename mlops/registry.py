"""Register a run's exported model in MLflow with its lineage; look versions up; load them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.recipe import load_recipe
from jobs.run_dir import RunDir
from mlops.tracking import client, experiment_id, tracking_uri

PIP_REQUIREMENTS = ["torch", "transformers", "safetensors", "tokenizers"]


class RegistryError(RuntimeError):
    """A registry operation that cannot proceed; the message says why and what to do."""


@dataclass
class Registered:
    """A registered model version and where it came from."""

    name: str
    version: str
    run_id: str
    tags: dict[str, str]
    reused: bool = False


def lineage_tags(run_dir: Path) -> dict[str, str]:
    """Recipe, data, commit, step and parent model of an exported model, as version tags."""
    run = RunDir.at(run_dir)
    model_dir, lineage = run.model_dir, run.lineage() or {}
    recipe = load_recipe(run.recipe_file)
    tags = {
        "privlm.recipe": recipe.name,
        "privlm.recipe_fingerprint": lineage.get("recipe_fingerprint") or "",
        "privlm.data_fingerprint": lineage.get("data_fingerprint") or "",
        "privlm.data_dir": str(recipe.data_path.resolve()),
        "privlm.git_commit": lineage.get("git_commit") or "unknown",
        "privlm.step": str(lineage.get("step")),
        "privlm.model_dir": str(model_dir.resolve()),
        "privlm.recipe_yaml": run.recipe_file.read_text()[:5000],
        "privlm.weights_sha256": _weights_digest(model_dir),
    }
    if lineage.get("eval_loss") is not None:
        tags["privlm.train_eval_loss"] = f"{lineage['eval_loss']:.6f}"
    if lineage.get("base_model"):
        tags["privlm.base_model_dir"] = str(Path(lineage["base_model"]).resolve())
    tags["privlm.method"] = lineage.get("method") or ("full" if lineage.get("base_model") else "pretrain")
    tags["privlm.data_format"] = lineage.get("data_format") or "text"
    if lineage.get("reference_model"):  # DPO: what its preference accuracy is measured against
        tags["privlm.reference_model_dir"] = str(Path(lineage["reference_model"]).resolve())
    if lineage.get("teacher"):  # distillation: the teacher version is the parent
        tags["privlm.teacher"] = tags["privlm.parent"] = lineage["teacher"]
    return tags


def _weights_digest(model_dir: Path) -> str:
    """SHA-256 over the safetensors files: the identity of the weights, whatever the path."""
    from jobs.train.checkpoint import sha256_file

    return hashlib.sha256("".join(sha256_file(f) for f in sorted(model_dir.glob("*.safetensors"))).encode()).hexdigest()


def find_version_by_model_dir(mlflow_client: Any, model_dir: str) -> Any | None:
    """The newest registered version whose exported model lives at `model_dir` (e.g. a fine-tune's parent)."""
    found = mlflow_client.search_model_versions(f"tags.`privlm.model_dir` = '{model_dir}'")
    return max(found, key=lambda mv: int(mv.version), default=None)


def register_run(run_dir: Path, name: str | None = None, uri: str | None = None) -> Registered:
    """Log `run_dir/model` as an MLflow transformers model in its training run and register a version."""
    run_dir = Path(run_dir)
    run = RunDir.at(run_dir)
    if run.lineage() is None:
        raise RegistryError(f"{run.model_dir} is not an exported privlm model; finish `privlm train run` first")
    recipe = load_recipe(run.recipe_file)
    name = name or recipe.model_name
    uri = uri or tracking_uri()
    mlflow_client = client(uri)
    tags = lineage_tags(run_dir)
    if "privlm.base_model_dir" in tags:
        parent = find_version_by_model_dir(mlflow_client, tags["privlm.base_model_dir"])
        tags["privlm.parent"] = f"{parent.name}/{parent.version}" if parent else "unregistered"
    existing = find_version_by_model_dir(mlflow_client, tags["privlm.model_dir"])
    if existing is not None and existing.name == name and \
            existing.tags.get("privlm.weights_sha256") == tags["privlm.weights_sha256"]:
        return Registered(name=name, version=str(existing.version), run_id=existing.run_id, tags=tags,
                          reused=True)
    run_id = _training_run_id(run_dir) or _new_run(mlflow_client, recipe)
    model_uri, model_id = _log_model(run.model_dir, run_id, uri)
    _ensure_registered_model(mlflow_client, name)
    mv = mlflow_client.create_model_version(name, source=model_uri, run_id=run_id, tags=tags, model_id=model_id)
    return Registered(name=name, version=str(mv.version), run_id=run_id, tags=tags)


def register_adapter(run_dir: Path, name: str | None = None, uri: str | None = None,
                     base_version: str | None = None) -> Registered:
    """Register a LoRA run's adapter (`run_dir/adapter`, not merged) as a version served on its base version
    (`base_version`, or the registered version exported to the run's `finetune.base`)."""
    run_dir = Path(run_dir)
    run = RunDir.at(run_dir)
    if not (run.adapter_dir / "adapter_config.json").is_file():
        raise RegistryError(f"{run.adapter_dir} holds no LoRA adapter; only `finetune.method: lora` runs have one")
    recipe = load_recipe(run.recipe_file)
    uri = uri or tracking_uri()
    tags = lineage_tags(run_dir)
    parent = (get_version(name, base_version, uri) if name and base_version else
              find_version_by_model_dir(client(uri), tags.get("privlm.base_model_dir", "")))
    if parent is None:
        raise RegistryError(f"the base model of {run_dir} ({tags.get('privlm.base_model_dir')}) is not registered; "
                            "register the pretraining run first")
    run_id = _training_run_id(run_dir) or _new_run(client(uri), recipe)
    return log_adapter(run.adapter_dir, name or parent.name, str(parent.version), run_id, uri, tags)


def log_adapter(adapter_dir: Path, name: str, base_version: str, run_id: str, uri: str | None = None,
                tags: dict[str, str] | None = None) -> Registered:
    """Log a peft adapter directory as plain artifacts and register it as a version of `name` on `base_version`."""
    import mlflow

    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifacts(str(adapter_dir), artifact_path="adapter")
    tags = {**(tags or {}), "privlm.adapter_of": f"{name}/{base_version}", "privlm.parent": f"{name}/{base_version}",
            "privlm.model_dir": str(Path(adapter_dir).resolve())}
    mlflow_client = client(uri)
    _ensure_registered_model(mlflow_client, name)
    source = f"{mlflow_client.get_run(run_id).info.artifact_uri}/adapter"
    mv = mlflow_client.create_model_version(name, source=source, run_id=run_id, tags=tags)
    return Registered(name=name, version=str(mv.version), run_id=run_id, tags=tags)


def _training_run_id(run_dir: Path) -> str | None:
    state = RunDir.at(run_dir).tracking_dir / "state.json"
    return json.loads(state.read_text()).get("run_id") if state.is_file() else None


def _new_run(mlflow_client: Any, recipe: Any) -> str:
    """A run to hold the model when training ran without tracking."""
    exp = experiment_id(mlflow_client, recipe.registry.experiment)
    run = mlflow_client.create_run(exp, run_name=f"{recipe.name}-register")
    mlflow_client.set_terminated(run.info.run_id)
    return run.info.run_id


def _log_model(model_dir: Path, run_id: str, uri: str) -> tuple[str, str | None]:
    """Log the Hugging Face directory with the transformers flavor, from its files (the weights are copied,
    never loaded); return its model URI and id."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # mlflow.transformers imports DeepSpeed
    import mlflow

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.transformers.log_model(
            transformers_model=str(Path(model_dir).resolve()), name="model", task="text-generation",
            pip_requirements=PIP_REQUIREMENTS,
        )
    return info.model_uri, getattr(info, "model_id", None)


def _ensure_registered_model(mlflow_client: Any, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.get_registered_model(name)
    except MlflowException:
        with contextlib.suppress(MlflowException):  # created concurrently
            mlflow_client.create_registered_model(name, tags={"privlm": "true"})


def require_model(name: str, uri: str | None = None) -> Any:
    """The registered model, or a RegistryError naming what exists (or that the server is down)."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(uri)
    try:
        return mlflow_client.get_registered_model(name)
    except MlflowException as exc:
        raise RegistryError(_unknown_model(mlflow_client, name, exc)) from None


def alias_version(name: str, alias: str, uri: str | None = None) -> Any:
    """The version an alias points at, or a RegistryError saying how to set it."""
    from mlflow.exceptions import MlflowException

    require_model(name, uri)
    try:
        return client(uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        raise RegistryError(f"{name} has no alias @{alias}; set it with `privlm model promote`") from None


def get_version(name: str, version: str | int, uri: str | None = None) -> Any:
    """A model version, or a RegistryError naming what exists."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(uri)
    require_model(name, uri)
    try:
        return mlflow_client.get_model_version(name, str(version))
    except MlflowException:
        versions = sorted(int(v.version) for v in mlflow_client.search_model_versions(f"name = '{name}'"))
        raise RegistryError(f"{name} has no version {version}; it has versions {versions}") from None


def _unknown_model(mlflow_client: Any, name: str, exc: Any) -> str:
    if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
        return f"the model registry at {mlflow_client.tracking_uri} did not answer: {str(exc)[:200]}"
    names = sorted(m.name for m in mlflow_client.search_registered_models())
    return f"no registered model named {name!r}; registered: {names or 'none'}"


def load_components(model_uri: str, uri: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of `models:/NAME/VERSION` or `models:/NAME@ALIAS`."""
    import mlflow

    mlflow.set_tracking_uri(uri or tracking_uri())
    parts = mlflow.transformers.load_model(model_uri, return_type="components")
    return parts["model"], parts["tokenizer"]


def local_model_dir(model_uri: str, uri: str | None = None, cache: Path | None = None) -> Path:
    """A local Hugging Face directory (weights, config, tokenizer) for `models:/NAME/VERSION`, as vLLM loads it.

    Versions logged with the transformers flavor keep the weights in `model/` and the tokenizer in
    `components/tokenizer/`; other versions (quantized checkpoints, adapters) are flat directories.
    Downloaded once per version (and registry, and artifact) into `cache` (default: ~/.cache/privlm/models).
    """
    import shutil

    from mlflow.artifacts import download_artifacts

    name, _, version = model_uri.removeprefix("models:/").partition("/")
    if not version.isdigit():
        raise RegistryError(f"{model_uri!r} is not models:/NAME/VERSION; resolve the alias first")
    mv = get_version(name, version, uri)
    digest = hashlib.sha256(f"{uri or tracking_uri()} {mv.source}".encode()).hexdigest()[:10]
    target = (cache or Path.home() / ".cache" / "privlm" / "models") / name / f"v{version}-{digest}"
    if (target / "config.json").is_file() or (target / "adapter_config.json").is_file():
        return target
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    fetched = Path(download_artifacts(artifact_uri=mv.source, tracking_uri=uri or tracking_uri(),
                                      dst_path=str(staging / "download")))
    flat = fetched / "model" if (fetched / "components").is_dir() else fetched
    out = staging / "hf"
    shutil.copytree(flat, out)
    tokenizer = fetched / "components" / "tokenizer"
    if tokenizer.is_dir():
        for f in tokenizer.iterdir():
            shutil.copy2(f, out / f.name)
    shutil.rmtree(target, ignore_errors=True)
    out.rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    return target
