"""Entry point the Pulumi CLI runs for `pulumi preview|up --policy-pack infra/policy`: serve the privlm policies.

The policies live in the repository's `infra` package (rules.py), which `privlm infra check` runs offline too;
the pack runs from its own directory, so the repository root goes on the import path first.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pulumi_policy import EnforcementLevel, PolicyPack

from infra.policy.rules import POLICIES

PolicyPack(name="privlm", policies=POLICIES, enforcement_level=EnforcementLevel.MANDATORY,
           description="privlm GPU clusters on AWS: placement group, EFA, no world ingress, encryption, IMDSv2, "
                       "no secrets in user data, cost tags")
