"""`pulumi up` runs this (Pulumi.yaml: `main: infra/`): the cluster of the stack's `privlm:cluster` spec."""

from infra.program import main

main()
