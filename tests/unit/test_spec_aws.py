"""The AWS cluster spec: every rule's exact message, structural errors, the catalog it reads."""

from __future__ import annotations

import copy
import csv
import re
from collections.abc import Callable
from typing import Any

import pytest

from infra.hardware import CATALOG, instance_types
from infra.spec import AwsSpec, Finding, SpecError, check_spec, load_spec, parse_spec
from tests.helpers import REPO

BASE: dict[str, Any] = {
    "provider": "aws", "name": "t", "region": "us-east-1", "availability_zone": "us-east-1a",
    "tags": {"owner": "me", "cost_centre": "cc-1"}, "ssh_cidrs": ["203.0.113.0/24"],
    "node_groups": [{"name": "p5", "instance_type": "p5.48xlarge", "count": 2, "fabric": "efa",
                     "capacity": {"type": "spot", "max_price_usd_per_hour": 30.0}}],
    "fsx": {"capacity_gib": 2400, "deployment_type": "SCRATCH_2"},
}


def findings(change: Callable[[dict], None]) -> list[Finding]:
    data = copy.deepcopy(BASE)
    change(data)
    return check_spec(parse_spec(data))


def group(**values: Any) -> Callable[[dict], None]:
    return lambda d: d["node_groups"][0].update(values)


def test_the_base_spec_has_no_findings() -> None:
    spec = parse_spec(copy.deepcopy(BASE))
    assert isinstance(spec, AwsSpec) and check_spec(spec) == []


RULES = {
    "EFA on a type without EFA": (
        group(instance_type="g6e.xlarge", capacity={"type": "on-demand"}),
        Finding("error", "node_groups.0.fabric",
                "fabric 'efa' but g6e.xlarge has no EFA interface; use an EFA type (g5.12xlarge, g5.48xlarge, "
                "g6e.48xlarge, p4d.24xlarge, p4de.24xlarge, p5.48xlarge, p5e.48xlarge, p5en.48xlarge) "
                "or set fabric: ethernet")),
    "GPU type without capacity in the region": (
        lambda d: d.update(region="eu-west-1", availability_zone="eu-west-1a"),
        Finding("error", "node_groups.0.instance_type",
                "p5.48xlarge has no capacity in region eu-west-1 per infra/catalog/regions.csv; use region "
                "us-east-1 or us-west-2, another type, or add the region's row with its source")),
    "node group outside the placement group's zone": (
        group(availability_zone="us-east-1b"),
        Finding("error", "node_groups.0.availability_zone",
                "us-east-1b is outside the cluster's zone us-east-1a, but compute nodes share one cluster placement "
                "group, which lives in one zone; remove availability_zone or set it to us-east-1a")),
    "zone of another region": (
        lambda d: d.update(availability_zone="us-west-2a"),
        Finding("error", "availability_zone", "us-west-2a is not in region us-east-1; use a zone such as us-east-1a")),
    "SSH open to the world": (
        lambda d: d.update(ssh_cidrs=["203.0.113.0/24", "0.0.0.0/0"]),
        Finding("error", "ssh_cidrs.1",
                "0.0.0.0/0 opens SSH to the whole internet; list your office or VPN ranges (e.g. 203.0.113.0/24) "
                "or leave ssh_cidrs empty and use SSM Session Manager")),
    "SSH open to the IPv6 world": (
        lambda d: d.update(ssh_cidrs=["::/0"]),
        Finding("error", "ssh_cidrs.0",
                "::/0 opens SSH to the whole internet; list your office or VPN ranges (e.g. 203.0.113.0/24) "
                "or leave ssh_cidrs empty and use SSM Session Manager")),
    "spot max price above on-demand": (
        group(capacity={"type": "spot", "max_price_usd_per_hour": 60.0}),
        Finding("warning", "node_groups.0.capacity.max_price_usd_per_hour",
                "60.0 is above the on-demand price of p5.48xlarge in us-east-1 (55.04 USD/h); spot is never worth "
                "more: lower it to at most 55.04 or use capacity type on-demand")),
    "FSx capacity off the step": (
        lambda d: d["fsx"].update(capacity_gib=3000),
        Finding("error", "fsx.capacity_gib",
                "3000 GiB is not a valid size for SCRATCH_2; use 1200, 2400 or a multiple of 2400 GiB "
                "(the next valid size is 4800)")),
    "FSx capacity below the minimum": (
        lambda d: d["fsx"].update(capacity_gib=1000, deployment_type="PERSISTENT_2", throughput_mb_per_tib=125),
        Finding("error", "fsx.capacity_gib",
                "1000 GiB is not a valid size for PERSISTENT_2; use 1200, 2400 or a multiple of 2400 GiB "
                "(the next valid size is 1200)")),
    "persistent FSx without a valid throughput": (
        lambda d: d["fsx"].update(deployment_type="PERSISTENT_2", throughput_mb_per_tib=300),
        Finding("error", "fsx.throughput_mb_per_tib",
                "300 is not a throughput of PERSISTENT_2; use one of (125, 250, 500, 1000)")),
    "scratch FSx with a throughput": (
        lambda d: d["fsx"].update(throughput_mb_per_tib=250),
        Finding("error", "fsx.throughput_mb_per_tib",
                "SCRATCH_2 has a fixed throughput; remove throughput_mb_per_tib or use PERSISTENT_2")),
    "InfiniBand on EC2": (
        group(fabric="infiniband"),
        Finding("error", "node_groups.0.fabric",
                "fabric 'infiniband' does not exist on EC2; use efa (GPU-to-GPU across nodes) or ethernet")),
    "type not in the catalog": (
        group(instance_type="p9.96xlarge", capacity={"type": "on-demand"}),
        Finding("error", "node_groups.0.instance_type",
                f"'p9.96xlarge' is not in the hardware catalog (infra/catalog/instances.csv); use one of "
                f"{sorted(instance_types())} or add a row with its source and date")),
}


@pytest.mark.parametrize("rule", RULES)
def test_rule_gives_its_exact_message(rule: str) -> None:
    change, expected = RULES[rule]
    assert findings(change) == [expected]


def test_valid_fsx_sizes_pass() -> None:
    for size in (1200, 2400, 4800, 7200, 24000):
        assert findings(lambda d, s=size: d["fsx"].update(capacity_gib=s)) == [], size


def test_errors_come_before_warnings_and_all_are_reported() -> None:
    def both(d: dict) -> None:
        d["node_groups"][0]["capacity"]["max_price_usd_per_hour"] = 99.0
        d["ssh_cidrs"] = ["0.0.0.0/0"]

    assert [(f.level, f.field) for f in findings(both)] == [
        ("error", "ssh_cidrs.0"), ("warning", "node_groups.0.capacity.max_price_usd_per_hour")]


STRUCTURE = {
    "max price on on-demand": (group(capacity={"type": "on-demand", "max_price_usd_per_hour": 3.0}),
                               "max_price_usd_per_hour applies to spot capacity only, not type='on-demand'"),
    "reservation without id": (group(capacity={"type": "reservation"}),
                               "reservation_id (cr-...) is required with type: reservation and only there"),
    "bad reservation id": (group(capacity={"type": "reservation", "reservation_id": "r-1"}),
                           "node_groups.0.capacity.reservation_id: String should match pattern"),
    "count above max": (group(count=5, max_count=4), "node group p5: count=5 must lie between min_count=5 and "
                                                     "max_count=4"),
    "missing cost centre": (lambda d: d["tags"].pop("cost_centre"), "tags.cost_centre: required field is missing"),
    "SCRATCH_1 (cannot link to S3)": (lambda d: d["fsx"].update(deployment_type="SCRATCH_1"),
                                      "fsx.deployment_type: Input should be 'SCRATCH_2', 'PERSISTENT_1' or"),
    "typo in a field": (group(instance_typ="p5.48xlarge"), "node_groups.0.instance_typ: unknown field"),
    "unknown provider": (lambda d: d.update(provider="gcp"), "provider: 'gcp' is not supported; use one of "
                                                             "['aws', 'onprem']"),
}


@pytest.mark.parametrize("case", STRUCTURE)
def test_structural_errors_name_the_field(case: str) -> None:
    change, message = STRUCTURE[case]
    data = copy.deepcopy(BASE)
    change(data)
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec(data)


def test_min_and_max_default_to_count_and_tags_carry_the_bill() -> None:
    spec = parse_spec(copy.deepcopy(BASE))
    assert isinstance(spec, AwsSpec)
    assert spec.node_groups[0].bounds == (2, 2)
    assert spec.resource_tags("vpc") == {"Name": "t-vpc", "privlm:cluster": "t", "owner": "me",
                                         "cost-centre": "cc-1"}


def test_onprem_specs_have_no_aws_findings() -> None:
    spec = load_spec(REPO / "infra" / "examples" / "onprem-h100.yaml")
    assert spec.provider == "onprem" and check_spec(spec) == []


def test_catalog_rows_have_a_source_and_a_date_and_regions_name_known_types() -> None:
    for name in ("instances.csv", "regions.csv", "gpus.csv", "servers.csv"):
        with open(CATALOG / name, newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert rows, name
        for row in rows:
            assert row["source"].strip() and re.fullmatch(r"\d{4}-\d{2}-\d{2}", row["date"]), (name, row)
    with open(CATALOG / "regions.csv", newline="") as fh:
        regions = list(csv.DictReader(fh))
    assert {r["instance_type"] for r in regions} == set(instance_types())


def test_catalog_agrees_with_ec2_describe_instance_types(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto ships AWS's own DescribeInstanceTypes data: vCPUs, memory, network cards, EFA, GPU count and model."""
    import boto3
    from moto import mock_aws

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, "testing")
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        described = {d["InstanceType"]: d for d in ec2.describe_instance_types(
            InstanceTypes=sorted(instance_types()))["InstanceTypes"]}
    for name, itype in instance_types().items():
        d = described[name]
        gpu = d["GpuInfo"]["Gpus"][0]
        assert (itype.vcpus, itype.memory_gib, itype.network_cards, itype.efa_interfaces, itype.gpus) == (
            d["VCpuInfo"]["DefaultVCpus"], d["MemoryInfo"]["SizeInMiB"] / 1024, d["NetworkInfo"]["MaximumNetworkCards"],
            d["NetworkInfo"].get("EfaInfo", {}).get("MaximumEfaInterfaces", 0), gpu["Count"]), name
        assert itype.gpu.split("-")[0] == gpu["Name"], name


def test_each_catalog_fact_is_stored_once_and_every_reader_uses_it() -> None:
    """Prices live only in regions.csv; cost and MFU read the same rows as the spec validators."""
    from cost.model import cloud_costs, load_scenario
    from jobs.train.metrics import gpu_peak_flops

    with open(CATALOG / "instances.csv", newline="") as fh:
        assert "on_demand_usd_per_hour" not in (csv.DictReader(fh).fieldnames or [])
    p5 = instance_types()["p5.48xlarge"]
    assert (p5.region, p5.on_demand_usd_per_hour) == ("us-east-1", p5.prices["us-east-1"].usd_per_hour)
    scenario = load_scenario(REPO / "recipes" / "cost" / "h100-buy-vs-p5-rent.yaml")
    assert (scenario.cloud.instance_type, scenario.cloud.pricing) == ("p5.48xlarge", "on_demand")
    assert cloud_costs(scenario)["usd_per_gpu_hour"] == pytest.approx(
        p5.on_demand_usd_per_hour / p5.gpus * (1 + scenario.cloud.support_pct))
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 156.0e12
    assert gpu_peak_flops("Tesla T4", "bf16") is None
