"""The cost model: closed forms, the guide's example, monotonicity, properties, planning, bad input."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cost.model import Scenario, ScenarioError, analyse, break_even_month, cumulative, load_scenario, npv, sensitivity
from cost.plan import TrainShape, model_state_bytes, smallest_fits
from cost.workload import interruption_cost
from infra.hardware import CatalogError
from jobs.train.schedule import young_daly_interval
from tests.helpers import REPO

GUIDE = REPO / "recipes" / "cost" / "guide-example.yaml"
H100 = REPO / "recipes" / "cost" / "h100-buy-vs-p5-rent.yaml"


def test_guide_example_totals_exactly() -> None:
    a = analyse(load_scenario(GUIDE))
    assert a["totals"] == {"cloud": 360_000.0, "own": 415_000.0}
    assert a["per_year"]["own"] == [280_000.0, 45_000.0, 45_000.0, 45_000.0]
    # The guide rounds this to "about 12 million": its own figures give (280k/3 + 45k) / $0.01.
    assert a["break_even_requests_per_year"] == pytest.approx((280_000 / 3 + 45_000) / 0.01)
    assert a["cheaper"] == "cloud" and a["break_even_month"] is None


def test_npv_closed_form() -> None:
    assert npv(100, 50, 3, 0.10) == pytest.approx(100 + 50 / 1.1 + 50 / 1.21 + 50 / 1.331)
    assert npv(100, 50, 3, 0.10, residual=20) == pytest.approx(100 + 50 / 1.1 + 50 / 1.21 + 50 / 1.331 - 20 / 1.331)
    assert npv(0, 120, 3, 0.0) == 360


def test_break_even_month_closed_form() -> None:
    cloud, own = cumulative(0, 120, 36), cumulative(100, 60, 36)  # 10/month vs 100 + 5/month
    assert break_even_month(cloud, own) == 20  # 100 + 5m <= 10m first at m = 20
    assert break_even_month(cumulative(0, 12, 24), cumulative(100, 12, 24)) is None


def test_young_daly() -> None:
    assert young_daly_interval(60, 3600) == pytest.approx(math.sqrt(2 * 60 * 3600))
    cost = interruption_cost(1.0, 60, 300)
    assert cost.overhead_fraction == pytest.approx(60 / cost.interval_s + cost.interval_s / 7200 + 300 / 3600)
    with pytest.raises(ValueError, match="spot_interruptions_per_hour"):
        interruption_cost(60.0, 60, 300)


def with_(base: Scenario, section: str, **values) -> Scenario:
    data = base.model_dump()
    data[section].update(values)
    return Scenario.model_validate(data)


def test_more_utilisation_never_makes_owning_costlier_per_token() -> None:
    base = load_scenario(H100)
    costs = [analyse(with_(base, "own", utilisation=u))["unit_costs"]["own"]["usd_per_million_train_tokens"]
             for u in (0.2, 0.35, 0.5, 0.65, 0.8, 0.95)]
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(costs)), costs


def test_more_interruptions_never_make_spot_cheaper() -> None:
    base = with_(load_scenario(H100), "cloud", pricing="spot")
    totals = [analyse(with_(base, "cloud", spot_interruptions_per_hour=r))["totals"]["cloud"]
              for r in (0.0, 0.01, 0.05, 0.1, 0.3, 0.6)]
    assert all(b >= a for a, b in itertools.pairwise(totals)), totals


def test_h100_scenario_is_sourced_and_sensible() -> None:
    a = analyse(load_scenario(H100))
    assert a["own"]["servers"] >= 1 and 0 < a["break_even_utilisation"] < 1
    assert a["totals"]["own"] > 0 and a["totals"]["cloud"] > 0
    rows = sensitivity(load_scenario(H100))
    assert rows and abs(rows[0]["high"] - rows[0]["low"]) >= abs(rows[-1]["high"] - rows[-1]["low"])


scenarios = st.builds(
    lambda params, tokens, requests, util, pricing, rate, servers, years: Scenario.model_validate({
        "name": "p", "years": years,
        "workload": {"params": params, "pretrain_tokens_per_year": tokens, "requests_per_year": requests},
        "cloud": {"pricing": pricing, "spot_interruptions_per_hour": rate},
        "own": {"utilisation": util, "servers": servers}}),
    st.floats(1e8, 1e11), st.floats(0, 5e12), st.floats(0, 1e9), st.floats(0.05, 1.0),
    st.sampled_from(["on_demand", "spot", "reserved"]), st.floats(0, 0.3), st.one_of(st.none(), st.integers(1, 64)),
    st.integers(1, 6))


@settings(max_examples=60, deadline=None)
@given(scenarios)
def test_costs_are_finite_and_break_even_matches_the_curves(s: Scenario) -> None:
    a = analyse(s)
    for key in ("cloud", "own"):
        assert all(math.isfinite(v) for v in a["curves"][key])
        assert a["totals"][key] >= 0 and a["cloud"]["annual"] >= 0 and a["own"]["annual"] >= 0
    m = a["break_even_month"]
    cloud, own = a["curves"]["cloud"], a["curves"]["own"]
    if m is None:
        assert all(o > c for c, o in zip(cloud[1:], own[1:], strict=True))
    else:
        assert own[m] <= cloud[m] and all(o > c for c, o in zip(cloud[1:m], own[1:m], strict=True))


def test_model_states_match_deepspeed_estimators() -> None:
    n, gpus_ = 7e9, 16
    assert model_state_bytes(n, 2, gpus_) == pytest.approx(2 * n + 18 * n / gpus_)  # estimate_zero2_..._needs
    assert model_state_bytes(n, 3, gpus_) == pytest.approx(18 * n / gpus_)  # estimate_zero3 (less a layer)
    assert model_state_bytes(n, 2, gpus_, offload_optimizer=True) == pytest.approx(2 * n)


def test_plan_finds_configurations_that_fit() -> None:
    shape = TrainShape(7e9, 32, 4096, 32, 4096, 1)
    fits = smallest_fits(shape, 1e11)
    assert fits and all(f["gib_per_gpu"] <= 141 for f in fits)
    p5 = next(f for f in fits if f["instance_type"] == "p5.48xlarge")
    assert p5["gpus"] % 8 == 0 and p5["days"] > 0


@pytest.mark.parametrize(("override", "fragment"), [
    ({"own.usd_per_kwh": -0.1}, "own.usd_per_kwh"),
    ({"own.utilisation": 1.5}, "own.utilisation"),
    ({"cloud.instance_type": "p5.48xlarg"}, "did you mean p5.48xlarge"),
    ({"own.server": "hgx-h100"}, "own.server"),
    ({"workload.params": None}, "workload.params"),
])
def test_bad_scenarios_name_the_field(override: dict, fragment: str) -> None:
    with pytest.raises((ScenarioError, CatalogError)) as info:
        load_scenario(H100, override)
    assert fragment in str(info.value)


def test_cost_cli_imports_no_torch_ray_or_pulumi() -> None:
    code = ("import sys; from typer.testing import CliRunner; from privlm.cli import app; "
            f"r = CliRunner().invoke(app, ['cost', 'report', '{GUIDE}']); assert r.exit_code == 0, r.output; "
            "bad = [m for m in ('torch', 'ray', 'pulumi_aws') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_compare_gives_json_for_tools() -> None:
    import json

    from typer.testing import CliRunner

    from privlm.cli import app

    result = CliRunner().invoke(app, ["cost", "compare", str(GUIDE), str(H100), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["scenario"] for r in rows] == ["guide-example", "h100-buy-vs-p5-rent"]
    assert rows[0]["totals"] == {"cloud": 360_000.0, "own": 415_000.0}
