"""Run the Pulumi program in-process under the SDK's mocks and record the resource graph it would create.

This is how the program is tested (Pulumi's recommended unit testing) and what `privlm infra check STACK`
runs: no CLI, no cloud account, no plugin. The mocks answer with the inputs plus the few computed outputs
the program reads (ARNs, addresses, the Lustre mount name), so every `apply` runs (preview=False).
"""

from __future__ import annotations

import inspect
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from infra.findings import Finding, Level, get
from infra.program import PROJECT

STACKS = Path(__file__).resolve().parent / "stacks"
FAKE_AMI = "ami-0123456789abcdef0"
# A placeholder for the stack's secret munge key when its stack file has none (it cannot: secrets are encrypted).
PLACEHOLDER_SECRET = "offline-placeholder-munge-key-0123456789abcdef"


@dataclass(frozen=True)
class Recorded:
    """One resource as the program registered it: type token, name, id, inputs and outputs (camelCase keys)."""

    type: str
    name: str
    id: str
    inputs: dict[str, Any]
    custom: bool
    outputs: dict[str, Any] = field(default_factory=dict)

    def get(self, *path: str | int, default: Any = None) -> Any:
        """A nested input, e.g. r.get("metadataOptions", "httpTokens")."""
        return get(self.inputs, *path, default=default)


@dataclass
class Graph:
    """The recorded resources of one program run, and the stack outputs."""

    resources: list[Recorded] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)

    def of_type(self, token: str) -> list[Recorded]:
        return [r for r in self.resources if r.type == token]

    def by_id(self, resource_id: str) -> Recorded | None:
        return next((r for r in self.resources if r.id == resource_id), None)

    def count(self) -> int:
        """Cloud (custom) resources, not providers or components: what `pulumi up` would create."""
        return sum(1 for r in self.resources if r.custom and not r.type.startswith("pulumi:providers:"))


def _computed(token: str, name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """Outputs AWS computes that the program reads."""
    service = token.split(":")[1].split("/")[0]
    extra: dict[str, Any] = {"arn": f"arn:aws:{service}:us-east-1:123456789012:{name}"}
    if token == "aws:s3/bucket:Bucket":
        extra["bucket"] = f"{inputs.get('bucketPrefix', name)}0001"
        extra["arn"] = f"arn:aws:s3:::{extra['bucket']}"
    elif token == "aws:fsx/lustreFileSystem:LustreFileSystem":
        extra |= {"dnsName": f"fs-0abc.fsx.{name}.amazonaws.com", "mountName": "abcdefgh"}
    elif token == "aws:ec2/instance:Instance":
        extra |= {"privateIp": "10.42.0.10", "publicIp": "198.51.100.10"}
    elif token == "aws:ec2/launchTemplate:LaunchTemplate":
        extra["latestVersion"] = 1
    return {"name": name, **extra, **inputs}


class RecordingMocks:
    """pulumi.runtime.Mocks that run the stack's transforms, record every resource and answer the AMI lookup.

    The mock monitor hands transforms over instead of running them (MockResourceArgs.transforms, and
    Mocks.register_transform for stack transforms): they run here, on the engine's camelCase properties, as
    the engine runs them.
    """

    def __init__(self) -> None:
        self.recorded: list[Recorded] = []
        self.stack_transforms: list[Callable] = []

    def register_transform(self, transform: Callable) -> None:
        self.stack_transforms.append(transform)

    def new_resource(self, args: Any) -> tuple[str, dict[str, Any]]:
        import pulumi

        inputs = dict(args.inputs)
        for transform in [*args.transforms, *self.stack_transforms]:
            result = transform(pulumi.ResourceTransformArgs(bool(args.custom), args.typ, args.name, inputs,
                                                            pulumi.ResourceOptions()))
            if inspect.isawaitable(result):
                raise TypeError(f"transform {transform.__name__} on {args.name}: the offline run takes synchronous "
                                "transforms only; return a ResourceTransformResult or None")
            if result is not None:
                inputs = dict(result.props)
        resource_id = f"{args.name}-id"
        outputs = _computed(args.typ, args.name, inputs)
        self.recorded.append(Recorded(args.typ, args.name, resource_id, inputs, bool(args.custom), outputs))
        return resource_id, outputs

    def call(self, args: Any) -> dict[str, Any]:
        if args.token == "aws:ssm/getParameter:getParameter":
            return {"name": args.args.get("name"), "value": FAKE_AMI, "type": "String"}
        return {}


def stack_file(stack: str | Path) -> Path:
    """A stack's file: a path, your stack infra/stacks/Pulumi.<stack>.yaml, or the shipped <stack>.template.yaml.

    Stack files are git-ignored (`pulumi config set --secret` writes ciphertext into them); the templates are
    what the repository ships.
    """
    path = Path(stack)
    if path.is_file():
        return path
    for candidate in (STACKS / f"Pulumi.{stack}.yaml", STACKS / f"{stack}.template.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"stack {stack}: no {STACKS / f'Pulumi.{stack}.yaml'} and no template "
                            f"{STACKS / f'{stack}.template.yaml'}; known stacks: {', '.join(known_stacks())} "
                            "(copy a template: cp infra/stacks/TEMPLATE.template.yaml "
                            f"infra/stacks/Pulumi.{stack}.yaml)")


def known_stacks() -> list[str]:
    """Names of your stack files and of the shipped templates in infra/stacks/."""
    names = {p.name.removeprefix("Pulumi.").removesuffix(".yaml") for p in STACKS.glob("Pulumi.*.yaml")}
    return sorted(names | {p.name.removesuffix(".template.yaml") for p in STACKS.glob("*.template.yaml")})


def stack_config(stack: str | Path) -> dict[str, Any]:
    """The `config:` of a stack (see stack_file)."""
    return (yaml.safe_load(stack_file(stack).read_text()) or {}).get("config", {})


def run(config: dict[str, Any], stack: str = "offline", validate: bool = True,
        transforms: list[Callable] | None = None) -> Graph:
    """Run the program with this stack config (keys `privlm:cluster`, `privlm:mungeKey`, ...) under mocks.

    `transforms` (pulumi.ResourceTransform) are registered as stack transforms before the program runs, so
    they change every resource as they would under `pulumi up`.
    """
    import pulumi

    from infra.program import build, spec_from_config

    config = {f"{PROJECT}:inventoryDir": tempfile.mkdtemp(prefix="privlm-offline-"), **config}
    munge = config.get(f"{PROJECT}:mungeKey")
    if not isinstance(munge, str):  # absent, or `secure:` ciphertext only the Pulumi CLI can decrypt
        config[f"{PROJECT}:mungeKey"] = munge = PLACEHOLDER_SECRET
    recorder = RecordingMocks()
    mocks = type("Recorder", (pulumi.runtime.Mocks,), {
        "new_resource": lambda _, a: recorder.new_resource(a), "call": lambda _, a: recorder.call(a),
        "register_transform": lambda _, t: recorder.register_transform(t)})()
    pulumi.runtime.set_all_config({k: v if isinstance(v, str) else _json(v) for k, v in config.items()},
                                  secret_keys=[f"{PROJECT}:mungeKey"])
    pulumi.runtime.set_mocks(mocks, project=PROJECT, stack=stack, preview=False)
    graph = Graph(secrets=[munge])

    @pulumi.runtime.test  # runs the program, then waits for every registration and for the returned Output
    def program() -> pulumi.Output:
        for transform in transforms or []:
            pulumi.runtime.register_resource_transform(transform)
        cfg = pulumi.Config(PROJECT)
        outputs = build(spec_from_config(cfg), cfg, validate=validate)
        return pulumi.Output.from_input(outputs).apply(lambda values: setattr(graph, "outputs", values or {}))

    program()
    graph.resources = recorder.recorded
    return graph


def _json(value: Any) -> str:
    import json

    return json.dumps(value)


def resource_types(graph: Graph) -> dict[str, int]:
    """How many resources of each type (short names, e.g. ec2/launchTemplate) the graph holds."""
    counts: dict[str, int] = {}
    for r in graph.resources:
        if r.custom and not r.type.startswith("pulumi:providers:"):
            short = re.sub(r"^[a-z]+:([^:]+):.*$", r"\1", r.type)
            counts[short] = counts.get(short, 0) + 1
    return counts


def policy_resources(graph: Graph, stack: str = "offline") -> list[Any]:
    """The recorded resources as CrossGuard sees a stack's: pulumi_policy.PolicyResource with their outputs.

    Secrets are unwrapped as the analyzer unwraps them; the mocks record no property dependencies, so the
    policies follow references by `id` (infra/policy/rules.py: Stack.refs).
    """
    from pulumi_policy import PolicyCustomTimeouts, PolicyResource, PolicyResourceOptions
    from pulumi_policy.deserialize import deserialize_properties

    resources, urns = [], set()
    for r in graph.resources:
        urn = f"urn:pulumi:{stack}::{PROJECT}::{r.type}::{r.name}"
        while urn in urns:  # two resources of one type and name under different parents
            urn += "'"
        urns.add(urn)
        props = deserialize_properties({**r.outputs, "id": r.id})
        opts = PolicyResourceOptions(protect=False, ignore_changes=[], delete_before_replace=None, aliases=[],
                                     custom_timeouts=PolicyCustomTimeouts(0, 0, 0), additional_secret_outputs=[])
        resources.append(PolicyResource(r.type, props, urn, r.name, opts, None, None, [], {}))
    return resources


def check(graph: Graph, only: list[str] | None = None) -> list[Finding]:
    """Every violation of the policy pack's policies (or of `only` these) on the graph, as Findings.

    These are the StackValidationPolicy objects `pulumi preview --policy-pack infra/policy` runs; a mandatory
    policy's violations are errors, an advisory one's warnings.
    """
    from pulumi_policy import EnforcementLevel, StackValidationArgs

    from infra.policy.rules import LEVELS, POLICIES

    resources = policy_resources(graph)
    names = {r.urn: r.name for r in resources}
    findings: list[Finding] = []
    for policy in POLICIES:
        if only is not None and policy.name not in only:
            continue
        level = LEVELS[policy.enforcement_level or EnforcementLevel.MANDATORY]

        def report(message: str, urn: str | None = None, rule: str = policy.name, level: Level = level) -> None:
            findings.append(Finding(level, names[urn] if urn else "stack", message, rule))

        policy.validate(StackValidationArgs(resources), report)
    return findings
