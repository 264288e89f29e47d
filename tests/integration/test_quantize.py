"""Quantization as a registry step against a real MLflow server: lineage, int8 on disk, perplexity delta, vLLM."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers import SMALL

pytestmark = pytest.mark.integration
NAME = f"quant-test-{uuid.uuid4().hex[:6]}"  # a fresh name: local_model_dir caches by name and version
# SMALL, but with head_dim 64: vLLM's CPU attention refuses SMALL's head_dim 16
MODEL = {**SMALL["model"], "hidden_size": 128, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 256,
         "vocab_size": 1024}


def save_model(out: Path, data_dir: Path, seed: int) -> Path:
    """A randomly initialised model with the prepared tokenizer, in Hugging Face format."""
    import shutil

    from jobs.recipe import ModelConfig
    from jobs.train.model import build_model

    build_model(ModelConfig.model_validate(MODEL), seed, eos_id=0).save_pretrained(out)
    for f in (data_dir / "tokenizer").iterdir():
        shutil.copy2(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def quantized(mlflow_server, small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """v1: a random SMALL model registered with lineage tags; v2: its w8a8 quantization."""
    from mlflow.tracking import MlflowClient

    from mlops.quantize import quantize_version
    from mlops.registry import _log_model

    tmp = tmp_path_factory.mktemp("quantize")
    client = MlflowClient(mlflow_server.uri)
    client.create_registered_model(NAME)
    run = client.create_run(client.create_experiment(f"{NAME}-exp")).info.run_id
    uri, model_id = _log_model(save_model(tmp / "parent", small_data, seed=3), run, mlflow_server.uri)
    lineage = {"privlm.recipe": "small", "privlm.data_fingerprint": "fp-123", "privlm.data_dir": str(small_data),
               "privlm.git_commit": "abc123", "privlm.recipe_yaml": "name: small\n"}
    client.create_model_version(NAME, uri, run_id=run, model_id=model_id, tags=lineage)
    result = quantize_version(NAME, "1", "w8a8", uri=mlflow_server.uri, device="cpu", max_blocks=16,
                              cache=tmp / "cache")
    return {"client": client, "uri": mlflow_server.uri, "result": result, "lineage": lineage, "tmp": tmp,
            "parent_dir": tmp / "parent"}


def download(quantized: dict, version: str) -> Path:
    from mlops.registry import local_model_dir

    return local_model_dir(f"models:/{NAME}/{version}", quantized["uri"], quantized["tmp"] / "fresh")


def test_new_version_with_lineage_int8_and_smaller(quantized) -> None:
    from safetensors import safe_open

    from mlops.quantize import weight_bytes

    r = quantized["result"]
    assert r["version"] == "2"
    tags = quantized["client"].get_model_version(NAME, "2").tags
    assert tags["privlm.quantized_from"] == tags["privlm.parent"] == f"{NAME}/1"
    assert tags["privlm.quant_scheme"] == "w8a8"
    assert tags["privlm.calibration"] == "none: weight absmax, dynamic activations"
    assert {k: tags[k] for k in quantized["lineage"]} == quantized["lineage"]
    model_dir = download(quantized, "2")  # the layout round-trips through local_model_dir
    config = json.loads((model_dir / "config.json").read_text())
    assert config["quantization_config"]["format"] == "int-quantized"
    assert (model_dir / "tokenizer.json").is_file()
    with safe_open(str(model_dir / "model.safetensors"), "pt") as st:
        dtypes = {k: st.get_slice(k).get_dtype() for k in st.keys()}  # noqa: SIM118
    proj = {k: v for k, v in dtypes.items() if "proj.weight" in k and not k.endswith("_scale")}
    assert proj and set(proj.values()) == {"I8"}
    assert int(tags["privlm.bytes"]) == weight_bytes(model_dir) < int(tags["privlm.parent_bytes"])
    assert int(tags["privlm.parent_bytes"]) == weight_bytes(quantized["parent_dir"])


def test_perplexity_delta_recorded_equals_recomputed(quantized, small_data: Path) -> None:
    from transformers import AutoModelForCausalLM

    from mlops.evaluate import perplexity

    tags = quantized["client"].get_model_version(NAME, "2").tags
    q, _ = perplexity(AutoModelForCausalLM.from_pretrained(download(quantized, "2")), small_data, 16)
    p, _ = perplexity(AutoModelForCausalLM.from_pretrained(quantized["parent_dir"]), small_data, 16)
    assert float(tags["eval.eval_perplexity"]) == pytest.approx(q, rel=1e-5)
    assert float(tags["eval.parent_perplexity"]) == pytest.approx(p, rel=1e-5)
    assert float(tags["eval.perplexity_delta"]) == pytest.approx((q - p) / p, abs=1e-5)
    assert q != p and abs((q - p) / p) < 0.01  # int8 per-channel: measurably different, barely worse
    assert tags["eval.generation_ok"] in ("0", "1") and "eval.dataset" in tags


def test_vllm_loads_the_quantized_version_and_generates(quantized) -> None:
    from mlops.quantize import vllm_generates

    out = vllm_generates(download(quantized, "2"))
    assert out["tokens"] == [16, 16]


@pytest.fixture(scope="module")
def adapter_version(quantized) -> str:
    """A version holding only a LoRA adapter (adapter_config.json, no config.json)."""
    client = quantized["client"]
    adapter = quantized["tmp"] / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    run = client.create_run(client.get_experiment_by_name(f"{NAME}-exp").experiment_id)
    client.log_artifacts(run.info.run_id, str(adapter), artifact_path="model")
    mv = client.create_model_version(NAME, f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
                                     tags={"privlm.parent": f"{NAME}/1"})
    return str(mv.version)


@pytest.mark.parametrize(("version", "args", "message"), [
    ("1", ["--scheme", "int3"],
     "unknown quantization scheme 'int3'; use one of ['fp8-dynamic', 'w4a16', 'w4a8', 'w8a16', 'w8a8']"),
    ("1", ["--scheme", "w4a16", "--device", "cpu"],
     "scheme 'w4a16' needs a GPU on vLLM 0.32; on CPU use one of ['fp8-dynamic', 'w4a8', 'w8a8']"),
    ("2", ["--scheme", "w8a8"], f"{NAME}/2 is already quantized (from {NAME}/1); quantize {NAME}/1 instead"),
    ("adapter", ["--scheme", "w8a8"], "is an adapter (adapter_config.json, no config.json)"),
])
def test_refusals_exit_2_with_the_reason(quantized, adapter_version, monkeypatch, version, args, message) -> None:
    from privlm.cli import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", quantized["uri"])
    version = adapter_version if version == "adapter" else version
    result = CliRunner().invoke(app, ["model", "quantize", NAME, version, *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_cli_quantizes_with_calibration_to_fp8(quantized, small_data: Path, monkeypatch) -> None:
    from safetensors import safe_open

    from privlm.cli import app

    monkeypatch.setenv("MLFLOW_TRACKING_URI", quantized["uri"])
    result = CliRunner().invoke(app, ["model", "quantize", NAME, "1", "--scheme", "fp8-dynamic", "--device", "cpu",
                                      "--calibration", str(small_data), "--max-blocks", "16"])
    assert result.exit_code == 0, result.output
    found = re.search(rf"{NAME}/(\d+): fp8-dynamic of {NAME}/1, .* MB\); perplexity ", result.output)
    assert found, result.output
    version = found.group(1)
    tags = quantized["client"].get_model_version(NAME, version).tags
    assert tags["privlm.calibration"].startswith(f"{small_data.resolve()} (")
    assert "weight clip chosen per layer for 14 layers on 8 train blocks" in tags["privlm.calibration"]
    assert abs(float(tags["eval.perplexity_delta"])) < 0.05
    with safe_open(str(download(quantized, version) / "model.safetensors"), "pt") as st:
        assert st.get_slice("model.layers.0.mlp.up_proj.weight").get_dtype() == "F8_E4M3"
