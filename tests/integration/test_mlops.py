"""MLflow against a real server: tracking through an outage, registry lineage, the promotion gate, races."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest

from tests.helpers import PRIVLM, REPO, SMALL, merge, privlm, read_losses, run_env, wait_for_step, write_recipe

pytestmark = pytest.mark.integration


def env_for(server) -> dict[str, str]:
    return {**run_env(), "MLFLOW_TRACKING_URI": server.uri}


def train(tmp: Path, data: Path, server, name: str, steps: int, **extra) -> Path:
    run = tmp / name
    recipe = merge(SMALL, {"name": name, "run_dir": str(run), "data": {"output_dir": str(data)},
                           "checkpoint": {"directory": str(run / "ckpt")},
                           "training": {"max_steps": steps, "warmup_steps": 1},
                           "registry": {"model_name": "privlm-test"}})
    privlm("train", "run", str(write_recipe(tmp / f"{name}.yaml", merge(recipe, extra))), env=env_for(server))
    return run


def run_id(run: Path) -> str:
    return json.loads((run / "tracking" / "state.json").read_text())["run_id"]


def test_metrics_survive_a_server_outage_mid_run(tmp_path: Path, small_data: Path, mlflow_server) -> None:
    from mlflow.tracking import MlflowClient

    run = tmp_path / "outage"
    recipe = write_recipe(tmp_path / "outage.yaml", merge(SMALL, {
        "name": "outage", "run_dir": str(run), "data": {"output_dir": str(small_data)},
        "checkpoint": {"directory": str(run / "ckpt"), "interval": 50}, "training": {"max_steps": 200}}))
    proc = subprocess.Popen([*PRIVLM, "train", "run", str(recipe)], cwd=REPO, env=env_for(mlflow_server),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(run, 10, proc)
        mlflow_server.stop()
        wait_for_step(run, max(read_losses(run)) + 40, proc)  # training goes on without the server
        mlflow_server.start()
        assert proc.wait(timeout=300) == 0
    finally:
        proc.kill()
        if mlflow_server.proc.poll() is not None:
            mlflow_server.start()
    privlm("model", "sync", str(run), env=env_for(mlflow_server))
    mlflow_client = MlflowClient(mlflow_server.uri)
    history = mlflow_client.get_metric_history(run_id(run), "loss")
    assert sorted(m.step for m in history) == list(range(1, 201))  # every step, none lost, none doubled
    assert {m.step: m.value for m in history} == pytest.approx(read_losses(run))
    info = mlflow_client.get_run(run_id(run))
    assert info.info.status == "FINISHED"
    assert info.data.params["training.max_steps"] == "200" and info.data.params["deepspeed.zero_stage"] == "1"
    pointer = json.loads(info.data.tags["privlm.checkpoint.latest"])
    assert pointer["step"] == 200 and Path(pointer["path"]).is_dir() and pointer["bytes"] > 0
    assert info.data.tags["privlm.data_fingerprint"] not in ("", "unknown")
    artifacts = mlflow_client.list_artifacts(run_id(run))
    assert not any("ckpt" in a.path or a.path.endswith(".pt") for a in artifacts)  # pointers, not copies


@pytest.fixture(scope="module")
def three_models(tmp_path_factory: pytest.TempPathFactory, small_data: Path, mlflow_server) -> dict[str, str]:
    """Runs of 2, 6 and 14 steps registered as versions 1-3 of privlm-test and evaluated."""
    tmp = tmp_path_factory.mktemp("registry")
    env = env_for(mlflow_server)
    versions = {}
    for name, steps in (("short", 2), ("medium", 6), ("long", 14)):
        run = train(tmp, small_data, mlflow_server, name, steps)
        out = privlm("model", "register", str(run), env=env).stdout
        versions[name] = out.split("version ")[1].split()[0]
        privlm("model", "evaluate", "privlm-test", versions[name], env=env)
    return versions


def test_register_carries_lineage_and_eval(three_models, mlflow_server, small_data: Path) -> None:
    out = privlm("model", "show", "privlm-test", "--json", env=env_for(mlflow_server)).stdout
    rows = {r["version"]: r for r in json.loads(out)}
    long = rows[three_models["long"]]
    assert long["recipe"] == "long" and long["step"] == "14" and long["commit"] not in (None, "unknown")
    assert long["data"] == json.loads((small_data / "manifest.json").read_text())["fingerprint"]
    ppl = {k: float(rows[v]["eval"]["eval_perplexity"]) for k, v in three_models.items()}
    assert ppl["long"] < ppl["medium"] < ppl["short"]


def test_a_model_is_registered_from_its_directory_without_loading_it(
        three_models, mlflow_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights are copied into the transformers flavor's layout, never loaded: loading them here fails."""
    import transformers
    from mlflow.tracking import MlflowClient

    from mlops.registry import local_model_dir, register_run

    model_dir = Path(MlflowClient(mlflow_server.uri).get_model_version("privlm-test", three_models["long"])
                     .tags["privlm.model_dir"])

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("register loaded the model into memory")

    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        monkeypatch.setattr(auto, "from_pretrained", no_loading)
    registered = register_run(model_dir.parent, name="privlm-test-copy", uri=mlflow_server.uri)
    monkeypatch.undo()
    assert not registered.reused
    served = local_model_dir(f"models:/privlm-test-copy/{registered.version}", mlflow_server.uri, tmp_path)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (served / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_promotion_gate_and_rollback(three_models, mlflow_server) -> None:
    from mlops.registry import load_components

    env = env_for(mlflow_server)
    v = three_models
    privlm("model", "promote", "privlm-test", v["medium"], env=env)
    first = privlm("model", "promote", "privlm-test", "--to", "champion", env=env)
    assert f"champion -> v{v['medium']}" in first.stdout
    privlm("model", "promote", "privlm-test", v["long"], env=env)
    better = privlm("model", "promote", "privlm-test", "--to", "champion", "--reason", "weekly", env=env)
    assert f"champion -> v{v['long']}" in better.stdout
    privlm("model", "promote", "privlm-test", v["short"], env=env)
    worse = privlm("model", "promote", "privlm-test", "--to", "champion", env=env, check=False)
    assert worse.returncode == 3
    assert "refused" in worse.stderr and f"v{v['short']}" in worse.stderr and f"v{v['long']}" in worse.stderr
    assert worse.stderr.count("eval_perplexity=") == 2  # both numbers
    assert champion(mlflow_server) == v["long"]
    back = privlm("model", "rollback", "privlm-test", env=env)
    assert f"champion -> v{v['medium']}" in back.stdout
    assert champion(mlflow_server) == v["medium"]
    model, tokenizer = load_components("models:/privlm-test@champion", mlflow_server.uri)
    ids = tokenizer("def ", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] == ids.shape[1] + 8


def champion(server) -> str:
    from mlflow.tracking import MlflowClient

    return str(MlflowClient(server.uri).get_model_version_by_alias("privlm-test", "champion").version)


def test_racing_promotions_leave_consistent_aliases(three_models, mlflow_server) -> None:
    from mlflow.tracking import MlflowClient

    from mlops.promote import PromotionRefused, champion_stack, events, promote_challenger, promote_champion

    uri = mlflow_server.uri
    barrier = threading.Barrier(2)
    errors: list[Exception] = []

    def promote(version: str) -> None:
        barrier.wait()
        try:
            promote_challenger("privlm-test", version, uri=uri)
            promote_champion("privlm-test", {"min_margin": 0.0}, uri=uri)
        except Exception as exc:  # a refusal is a legitimate outcome of the race
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(three_models[k],)) for k in ("long", "short")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    mlflow_client = MlflowClient(uri)
    stack = champion_stack(events(mlflow_client, "privlm-test"))
    assert champion(mlflow_server) == stack[-1]
    assert stack[-1] != three_models["short"]  # the worse model never wins a race
    short = three_models["short"]
    for e in errors:  # only the worse model is refused, for its numbers (a winner already in place is no error)
        assert isinstance(e, PromotionRefused), repr(e)
        assert str(e).startswith(f"refused: challenger v{short} eval_perplexity="), str(e)
        assert str(e).endswith("is not above the margin"), str(e)


def test_bad_registry_input_is_refused_without_changing_aliases(three_models, mlflow_server) -> None:
    env = env_for(mlflow_server)
    before = champion(mlflow_server)
    unknown = privlm("model", "evaluate", "no-such-model", "1", env=env, check=False)
    assert unknown.returncode == 1 and "no registered model named 'no-such-model'" in unknown.stderr
    missing = privlm("model", "promote", "privlm-test", "99", env=env, check=False)
    assert missing.returncode == 1 and "has no version 99" in missing.stderr
    privlm("model", "promote", "privlm-test", three_models["short"], env=env)
    lacking = privlm("model", "promote", "privlm-test", "--to", "champion", "--metric", "bleu", env=env, check=False)
    assert lacking.returncode == 1 and "has no 'bleu'" in lacking.stderr
    down = privlm("model", "rollback", "privlm-test", env={**env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
                  check=False)
    assert down.returncode == 1 and "did not answer" in down.stderr
    assert champion(mlflow_server) == before


def test_cost_of_a_tracked_run(three_models, mlflow_server) -> None:
    from mlflow.tracking import MlflowClient

    version = MlflowClient(mlflow_server.uri).get_model_version("privlm-test", three_models["long"])
    out = privlm("cost", "run", version.run_id, env=env_for(mlflow_server)).stdout
    assert "p5.48xlarge" in out and "as run (2 x cpu)" in out
