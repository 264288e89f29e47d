"""The Slurm fixtures of the integration tests, for the end-to-end test."""

from tests.integration.conftest import slurm_cluster  # noqa: F401
