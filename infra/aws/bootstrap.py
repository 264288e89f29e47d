"""What makes an EC2 instance a node of the same Slurm cluster as on-prem ones: one inventory, short user data.

Pulumi uploads three objects to the cluster's bucket, each named by its content hash: our playbooks, the
cluster's inventory (every node a group may scale to, addressed by name in the cluster's private DNS
zone, so every node renders the same slurm.conf) and `node_name.py`. A node's user data then, once: writes
the munge key from SSM Parameter Store (a SecureString its role may read; no secret is ever in user
data), fetches the three objects, claims its Slurm node name and publishes its address (`node_name.py`),
and runs `site.yml` limited to itself, every host of the inventory reached by local connection. The
shared_storage role mounts FSx for Lustre and the head's NFS exports from `shared_storage_mounts`.
Plain Python: the program resolves the Pulumi outputs first and passes their values in `BootFacts`.
"""

from __future__ import annotations

import hashlib
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from infra.hardware import instance_types
from infra.spec import AwsSpec, InstanceGroup, Mount

HEAD = "head"
WORK = "/opt/privlm"
MUNGE_KEY = "/etc/munge/munge.key"
NODE_NAME_SCRIPT = Path(__file__).with_name("node_name.py")


@dataclass(frozen=True)
class BootFacts:
    """Values of created resources that a booting node needs (resolved Pulumi outputs)."""

    bucket: str
    playbooks_key: str
    munge_parameter: str
    zone_id: str
    zone_name: str  # the cluster's private hosted zone, e.g. p5-spot.privlm.internal
    lustre_dns: str = ""
    lustre_mount_name: str = ""

    def fqdn(self, name: str) -> str:
        return f"{name}.{self.zone_name}"


def content_key(kind: str, content: str | bytes, suffix: str) -> str:
    """The bucket key of an uploaded bootstrap object: a new name, so new user data, whenever it changes."""
    data = content.encode() if isinstance(content, str) else content
    return f"bootstrap/{kind}-{hashlib.sha256(data).hexdigest()[:16]}{suffix}"


def node_slots(spec: AwsSpec) -> list[tuple[str, InstanceGroup]]:
    """Slurm node names of the cluster: `<group>-<n>` for every instance a group may scale to."""
    return [(f"{g.name}-{n}", g) for g in spec.node_groups for n in range(g.bounds[1])]


def mounts(spec: AwsSpec, facts: BootFacts) -> list[Mount]:
    """Shared file systems of the cluster: the spec's (NFS from the head by default) and FSx for Lustre."""
    shared = [m if m.source else m.model_copy(update={"source": f"{facts.fqdn(HEAD)}:{m.path}"})
              for m in spec.storage]
    if spec.fsx and facts.lustre_dns:
        shared.append(Mount(path=spec.fsx.mount_path, type="lustre",
                            source=f"{facts.lustre_dns}@tcp:/{facts.lustre_mount_name}"))
    return shared


def node_vars(group: InstanceGroup) -> dict:
    """Slurm resources of one instance of the group, from the hardware catalog."""
    itype = instance_types()[group.instance_type]
    node = {"slurm_cpus": itype.vcpus, "slurm_real_memory": int(itype.memory_gib * 1024 * 0.95),
            "privlm_fabric": group.fabric}
    if itype.gpus:
        node |= {"slurm_gpus": itype.gpus, "slurm_gpu_type": itype.gpu.split("-")[0].lower()}
    return node


def cluster_inventory(spec: AwsSpec, facts: BootFacts) -> str:
    """The inventory every node runs site.yml with (limited to itself): the head and every node slot."""
    slots = node_slots(spec)
    partitions = []
    for p in spec.partitions:
        members = [slot for slot, group in slots if group.name in p.node_groups]
        partitions.append({"name": p.name, "priority_tier": p.priority_tier, "grace_time": p.grace_time_s,
                           "default": p.default, "max_time": p.max_time,
                           **({"nodes": ",".join(members)} if p.node_groups else {})})
    exports = [{"path": m.path} for m in spec.storage if m.type == "nfs" and not m.source]
    head = {"ansible_host": facts.fqdn(HEAD), **({"shared_storage_nfs_exports": exports} if exports else {})}
    nodes = {slot: {"ansible_host": facts.fqdn(slot), "slurm_node_name": slot, "slurm_node_hostname": slot,
                    **node_vars(group)} for slot, group in slots}
    shared = {"ansible_connection": "local", "ansible_python_interpreter": f"{WORK}/ansible/bin/python",
              "ansible_user": spec.ssh_user, "slurm_cluster_name": spec.name, "slurm_accounting": spec.accounting,
              "slurm_partitions": partitions, "shared_storage_mounts": [m.model_dump() for m in mounts(spec, facts)]}
    return (f"# Inventory of the AWS cluster {spec.name}, rendered by the Pulumi program: every node runs site.yml\n"
            "# with --limit <itself>; tasks it delegates to the head (the munge key) run locally, the key in place.\n"
            + yaml.safe_dump({"all": {"vars": shared, "hosts": {HEAD: head, **nodes},
                                      "children": {"slurm_controller": {"hosts": {HEAD: None}},
                                                   "slurm_nodes": {"hosts": dict.fromkeys(nodes)}}}},
                             sort_keys=False))


def boot_script(spec: AwsSpec, group: InstanceGroup | None, facts: BootFacts, inventory_key: str,
                node_name_key: str) -> str:
    """The shell steps cloud-init runs once on the head (group None) or an instance of a node group."""
    q = shlex.quote
    names = [HEAD] if group is None else [slot for slot, g in node_slots(spec) if g.name == group.name]
    s3 = f"aws s3 cp --region {q(spec.region)} s3://{facts.bucket}"
    return "\n".join([
        "set -euo pipefail",
        'imds() { t=$(curl -sX PUT http://169.254.169.254/latest/api/token '
        '-H "X-aws-ec2-metadata-token-ttl-seconds: 300"); '
        'curl -s -H "X-aws-ec2-metadata-token: $t" "http://169.254.169.254/latest/meta-data/$1"; }',
        # the cluster's munge key replaces the one the package generates, before the munge role reads it
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -q munge",
        f"aws ssm get-parameter --region {q(spec.region)} --name {q(facts.munge_parameter)} --with-decryption "
        f"--query Parameter.Value --output text | base64 -d > {MUNGE_KEY}.new",
        f"install -o munge -g munge -m 0400 {MUNGE_KEY}.new {MUNGE_KEY} && rm {MUNGE_KEY}.new",
        f"python3 -m venv {WORK}/ansible",
        f"{WORK}/ansible/bin/pip install -q 'ansible>=10,<13' boto3",
        f"{s3}/{facts.playbooks_key} {WORK}/playbooks.zip && unzip -oq {WORK}/playbooks.zip -d {WORK}/playbooks",
        f"{s3}/{inventory_key} {WORK}/hosts.yml",
        f"{s3}/{node_name_key} {WORK}/node_name.py",
        f"name=$({WORK}/ansible/bin/python {WORK}/node_name.py --region {q(spec.region)} --bucket {q(facts.bucket)} "
        f"--zone-id {q(facts.zone_id)} --zone-name {q(facts.zone_name)} --names {q(','.join(names))} "
        '--instance-id "$(imds instance-id)" --address "$(imds local-ipv4)")',
        'hostnamectl set-hostname "$name"',
        f"cd {WORK}/playbooks && ANSIBLE_CONFIG={WORK}/playbooks/ansible.cfg "
        f'{WORK}/ansible/bin/ansible-playbook -i {WORK}/hosts.yml site.yml --limit "$name"',
    ])


def user_data(spec: AwsSpec, group: InstanceGroup | None, facts: BootFacts, inventory_key: str,
              node_name_key: str) -> str:
    """#cloud-config for the head (group None) or an instance of a node group."""
    config = {"package_update": True, "packages": ["python3-venv", "unzip", "nfs-common"],
              "runcmd": [["bash", "-c", boot_script(spec, group, facts, inventory_key, node_name_key)]]}
    return "#cloud-config\n" + yaml.safe_dump(config, sort_keys=False, width=1000)
