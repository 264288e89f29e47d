"""Cloud-init user data that makes an EC2 instance a node of the same Slurm cluster as on-prem ones.

At boot a node: writes the munge key from SSM Parameter Store (a SecureString the
instance role may read; no secret is ever in the user data), fetches our playbooks from the cluster's
bucket (Pulumi uploads them, named by their content hash) and runs `site.yml` on itself with a node-local
inventory: the head as `slurm_controller`, this node as itself; the shared_storage role mounts FSx for
Lustre (and the head's NFS exports) from `shared_storage_mounts`. Plain Python: the program resolves the
Pulumi outputs first and passes their values in `BootFacts`.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

import yaml

from infra.hardware import instance_types
from infra.spec import AwsSpec, InstanceGroup, Mount

HEAD = "head"
PLAYBOOKS_DIR = "/opt/privlm/playbooks"
INVENTORY = "/etc/privlm/inventory/hosts.yml"
MUNGE_KEY = "/etc/munge/munge.key"


@dataclass(frozen=True)
class BootFacts:
    """Values of created resources that a booting node needs (resolved Pulumi outputs)."""

    bucket: str
    playbooks_key: str
    munge_parameter: str
    head_address: str  # private address the compute nodes reach slurmctld on ("" on the head itself)
    lustre_dns: str = ""
    lustre_mount_name: str = ""


def mounts(spec: AwsSpec, facts: BootFacts) -> list[Mount]:
    """Shared file systems of the cluster: the spec's (NFS from the head by default) and FSx for Lustre."""
    shared = [m if m.source else m.model_copy(update={"source": f"{facts.head_address}:{m.path}"})
              for m in spec.storage]
    if spec.fsx and facts.lustre_dns:
        shared.append(Mount(path=spec.fsx.mount_path, type="lustre",
                            source=f"{facts.lustre_dns}@tcp:/{facts.lustre_mount_name}"))
    return shared


def cluster_vars(spec: AwsSpec, facts: BootFacts) -> dict:
    """Inventory variables every node of the cluster shares (as infra/inventory.py renders for on-prem)."""
    shared = [m.model_dump() for m in mounts(spec, facts)]
    partitions = []
    for p in spec.partitions:
        members = [slot for slot, group in node_slots(spec) if group.name in p.node_groups]
        partitions.append({"name": p.name, "priority_tier": p.priority_tier, "grace_time": p.grace_time_s,
                           "default": p.default, "max_time": p.max_time,
                           **({"nodes": ",".join(members)} if p.node_groups else {})})
    return {"ansible_user": spec.ssh_user, "slurm_cluster_name": spec.name, "slurm_accounting": spec.accounting,
            "slurm_partitions": partitions, "shared_storage_mounts": shared}


def node_slots(spec: AwsSpec) -> list[tuple[str, InstanceGroup]]:
    """Slurm node names the controller knows: `<group>-<n>` for every instance a group may scale to."""
    return [(f"{g.name}-{n}", g) for g in spec.node_groups for n in range(g.bounds[1])]


def node_vars(group: InstanceGroup) -> dict:
    """Slurm resources of one instance of the group, from the hardware catalog."""
    itype = instance_types()[group.instance_type]
    node = {"slurm_cpus": itype.vcpus, "slurm_real_memory": int(itype.memory_gib * 1024 * 0.95),
            "privlm_fabric": group.fabric}
    if itype.gpus:
        node |= {"slurm_gpus": itype.gpus, "slurm_gpu_type": itype.gpu.split("-")[0].lower()}
    return node


def node_inventory(spec: AwsSpec, group: InstanceGroup | None, facts: BootFacts) -> str:
    """The node-local inventory: this node (`localhost`, local connection) and the head as controller."""
    local = {"ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3"}
    if group is None:
        exports = [{"path": m.path} for m in spec.storage if m.type == "nfs" and not m.source]
        slots = {slot: {"ansible_host": slot, "slurm_node_name": slot, **node_vars(g)} for slot, g in node_slots(spec)}
        hosts = {HEAD: {**local, "ansible_host": "127.0.0.1",
                        **({"shared_storage_nfs_exports": exports} if exports else {})}, **slots}
        # the slots are only rendered into slurm.conf: the head's run is limited to itself
        children = {"slurm_controller": {"hosts": {HEAD: None}}, "slurm_nodes": {"hosts": dict.fromkeys(slots)}}
    else:
        # the head's tasks this node delegates to (munge key) run here: the key is already in place
        hosts = {HEAD: {**local, "ansible_host": facts.head_address},
                 "localhost": {**local, "slurm_node_name": "{{ privlm_node_name }}", **node_vars(group)}}
        children = {"slurm_controller": {"hosts": {HEAD: None}}, "slurm_nodes": {"hosts": {"localhost": None}}}
    return yaml.safe_dump({"all": {"vars": cluster_vars(spec, facts), "hosts": hosts, "children": children}},
                          sort_keys=False)


def boot_script(spec: AwsSpec, group: InstanceGroup | None, facts: BootFacts) -> str:
    """The shell steps cloud-init runs once: munge key, playbooks, then our roles on this node."""
    q = shlex.quote
    limit = HEAD if group is None else "localhost"
    name = f"{spec.name}-head" if group is None else f"{group.name}-$(imds instance-id)"
    return "\n".join([
        "set -euo pipefail",
        'imds() { t=$(curl -sX PUT http://169.254.169.254/latest/api/token '
        '-H "X-aws-ec2-metadata-token-ttl-seconds: 300"); '
        'curl -s -H "X-aws-ec2-metadata-token: $t" "http://169.254.169.254/latest/meta-data/$1"; }',
        f"install -d -m 0700 {q(MUNGE_KEY.rsplit('/', 1)[0])}",
        f"aws ssm get-parameter --region {q(spec.region)} --name {q(facts.munge_parameter)} --with-decryption "
        f"--query Parameter.Value --output text | base64 -d > {q(MUNGE_KEY)}",
        f"chmod 0400 {q(MUNGE_KEY)}",
        f"install -d {q(PLAYBOOKS_DIR)}",
        f"aws s3 cp --region {q(spec.region)} {q(f's3://{facts.bucket}/{facts.playbooks_key}')} /tmp/playbooks.zip",
        f"unzip -oq /tmp/playbooks.zip -d {q(PLAYBOOKS_DIR)}",
        "python3 -m venv /opt/privlm/ansible && /opt/privlm/ansible/bin/pip install -q 'ansible-core>=2.17,<2.20'",
        f"cd {q(PLAYBOOKS_DIR)} && ANSIBLE_CONFIG={q(PLAYBOOKS_DIR + '/ansible.cfg')} "
        f"/opt/privlm/ansible/bin/ansible-playbook -i {q(INVENTORY)} site.yml --limit {limit} "
        f'-e privlm_node_name="{name}"',
    ])


def user_data(spec: AwsSpec, group: InstanceGroup | None, facts: BootFacts) -> str:
    """#cloud-config for the head (group None) or an instance of a node group."""
    config: dict = {
        "package_update": True,
        "packages": ["python3-venv", "unzip", "nfs-common"],
        "write_files": [{"path": INVENTORY, "permissions": "0600", "content": node_inventory(spec, group, facts)}],
        "runcmd": [["bash", "-c", boot_script(spec, group, facts)]],
    }
    return "#cloud-config\n" + yaml.safe_dump(config, sort_keys=False, width=1000)
