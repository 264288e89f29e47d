"""Published checkpoints on S3: background upload (multipart, verified by size and SHA-256) and restore.

The shared filesystem stays the primary copy: training publishes there first, then hands the
directory to `CheckpointSync`, whose worker thread uploads it while training goes on. A checkpoint
counts as synced only when every object's size and SHA-256 (stored as object metadata and checked
after upload) match and a `_COMPLETE` marker listing them is written last. `restore_latest` fetches the
newest complete checkpoint when the local copy is missing, verifying each file.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from typing import Any

from jobs.files import atomic_write_text
from jobs.train.checkpoint import sha256_file

MARKER = "_COMPLETE.json"


def _split(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise ValueError(f"checkpoint.s3_uri={uri!r} must look like s3://bucket/prefix")
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def s3_client(endpoint_url: str | None = None) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint_url)


def upload_checkpoint(local: Path, uri: str, client: Any) -> dict[str, Any]:
    """Upload one published checkpoint directory; verify each object; write the marker last."""
    from boto3.s3.transfer import TransferConfig

    bucket, prefix = _split(uri)
    config = TransferConfig(multipart_threshold=8 * 1024 * 1024, multipart_chunksize=8 * 1024 * 1024)
    files = {}
    for f in sorted(p for p in local.rglob("*") if p.is_file()):
        rel = f.relative_to(local).as_posix()
        key = f"{prefix}/{local.name}/{rel}".lstrip("/")
        digest = sha256_file(f)
        client.upload_file(str(f), bucket, key, Config=config, ExtraArgs={"Metadata": {"sha256": digest}})
        head = client.head_object(Bucket=bucket, Key=key)
        if head["ContentLength"] != f.stat().st_size or head["Metadata"].get("sha256") != digest:
            raise OSError(f"s3://{bucket}/{key} does not match {f} after upload")
        files[rel] = {"size": f.stat().st_size, "sha256": digest}
    marker = {"tag": local.name, "files": files}
    client.put_object(Bucket=bucket, Key=f"{prefix}/{local.name}/{MARKER}".lstrip("/"), Body=json.dumps(marker))
    return marker


def restore_latest(directory: Path, uri: str, client: Any) -> Path | None:
    """Download the newest complete checkpoint from S3 into `directory` (verified); None if S3 has none."""
    bucket, prefix = _split(uri)
    paginator = client.get_paginator("list_objects_v2")
    tags = sorted({obj["Key"][len(prefix):].strip("/").split("/")[0]
                   for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
                   for obj in page.get("Contents", []) if obj["Key"].endswith(MARKER)}, reverse=True)
    if not tags:
        return None
    tag = tags[0]
    base = f"{prefix}/{tag}".lstrip("/")
    marker = json.loads(client.get_object(Bucket=bucket, Key=f"{base}/{MARKER}")["Body"].read())
    staging = directory / ".staging" / tag
    staging.mkdir(parents=True, exist_ok=True)
    for rel, info in marker["files"].items():
        target = staging / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, f"{base}/{rel}", str(target))
        if target.stat().st_size != info["size"] or sha256_file(target) != info["sha256"]:
            raise OSError(f"{target} from S3 does not match its recorded size and checksum")
    final = directory / tag
    staging.rename(final)
    atomic_write_text(directory / "latest", tag)
    return final


class CheckpointSync:
    """A worker thread that uploads published checkpoints in order, never blocking the training loop."""

    def __init__(self, uri: str, endpoint_url: str | None = None) -> None:
        self.uri = uri
        self.client = s3_client(endpoint_url)
        self.synced: list[str] = []
        self.errors: list[str] = []
        self._queue: queue.Queue[Path | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="s3-sync", daemon=True)
        self._thread.start()

    def submit(self, checkpoint_dir: Path) -> None:
        self._queue.put(checkpoint_dir)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                upload_checkpoint(item, self.uri, self.client)
                self.synced.append(item.name)
            except Exception as exc:  # a failed upload is retried with the next checkpoint; training goes on
                self.errors.append(f"{item.name}: {exc}")
                print(f"[privlm] S3 sync of {item.name} failed: {exc}", flush=True)

    def close(self, timeout_s: float = 600) -> None:
        """Wait for queued uploads (end of training or before a requeue)."""
        self._queue.put(None)
        self._thread.join(timeout_s)
