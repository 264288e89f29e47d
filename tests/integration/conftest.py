"""Fixtures of the integration tests: real Slurm clusters on this machine, brought up by our playbook.

Use them from any test under tests/integration:

    def test_my_job(slurm_cluster, monkeypatch):
        monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.slurm_conf))  # for submitit, sbatch, squeue
        job = slurm_cluster.sbatch("-p", slurm_cluster.low_partition, "--wrap", "true")
        slurm_cluster.job_field(job, "JobState")

Each yields a `SlurmCluster` (tests/integration/slurm_fixture.py): `slurm_conf` (export it as
SLURM_CONF, or pass `env`), `partitions` ({"low", "high"}) / `low_partition` (preemptible, default) /
`high_partition`, `nodes`, `name`, `accounting`, `inventory`, `first_run` (ansible-runner result of the
bring-up) and `run(*cmd)`, `sbatch(*args)`, `job_field(job, field)`, `node_states()`. Both clusters can
run at once (own configuration directories and ports); each is brought up once per session, and at
the end every daemon it started is stopped by PID.

Preemption timing (measured): the preempted job gets its --signal within ~1 s, TERM when GraceTime
(5 s) has passed at slurmctld's next 15-30 s check, and runs again ~10 s after its requeue.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.monitoring_fixture import MonitoringStack
from tests.integration.slurm_fixture import SlurmCluster


def _bring_up(inventory: str, playbook: str) -> Iterator[SlurmCluster]:
    cluster = SlurmCluster(inventory, playbook)
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """One Slurm node on this machine (playbooks/inventories/local, SLURM_CONF=/etc/slurm/slurm.conf)."""
    yield from _bring_up("local", "site.yml")


@pytest.fixture(scope="session")
def slurm_cluster_2node() -> Iterator[SlurmCluster]:
    """Two slurmd on this machine with accounting (playbooks/inventories/local-2node), beside slurm_cluster.

    Brought up with slurm.yml: site.yml's hardware roles are tested on the one-node cluster.
    """
    yield from _bring_up("local-2node", "slurm.yml")


@pytest.fixture(scope="session")
def monitoring_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MonitoringStack]:
    """Prometheus, Alertmanager, the exporters and our receiver on 127.0.0.1, started by the monitoring role.

    A `MonitoringStack` (tests/integration/monitoring_fixture.py, whose docstring lists the interface):
    scrape every second, alerts grouped after 1 s, PrivlmCheckpointStale after 1 s. Add the gateway
    with `add_gateway(target, token_file, ca_file, scheme)`, shorten a rule with `override_rules(...)`,
    wait for a delivered alert with `wait_for_alert(name)`, query with `prometheus.value(promql)`.
    Stopped at the end of the session by the role (state stopped); every daemon by its PID file.
    """
    with MonitoringStack(tmp_path_factory.mktemp("monitoring"),
                         rule_overrides={"checkpoint_stale": {"for": "1s"}}) as stack:
        yield stack
