"""The privlm CrossGuard policy pack: `pulumi preview --policy-pack infra/policy` (policies in rules.py)."""
