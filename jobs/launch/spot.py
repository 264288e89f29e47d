"""Spot interruption notices from the EC2 instance metadata service (IMDSv2), turned into a stop request.

Event sequence it handles:
1. AWS decides to reclaim the instance: `spot/instance-action` answers 200 with the action and time
   (two minutes ahead), or a rebalance recommendation appears at `events/recommendations/rebalance`.
2. The watcher (a daemon thread, polling every few seconds with an IMDSv2 session token) calls
   `on_notice` once: the trainer treats it like SIGUSR2, writes a checkpoint at the next step boundary
   and exits 140, and the job runner requeues the job.
A 404 means no notice; an unreachable endpoint (not on EC2) is logged once and polling goes on.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_ENDPOINT = "http://169.254.169.254"


@dataclass(frozen=True)
class Notice:
    kind: str  # "instance-action" or "rebalance"
    detail: dict


class SpotWatcher:
    """Polls IMDSv2 for spot interruption and rebalance notices; calls `on_notice` at most once."""

    def __init__(self, on_notice: Callable[[Notice], None], endpoint: str = DEFAULT_ENDPOINT,
                 poll_s: float = 5.0, include_rebalance: bool = True) -> None:
        self.on_notice, self.endpoint, self.poll_s = on_notice, endpoint.rstrip("/"), poll_s
        self.include_rebalance = include_rebalance
        self.notice: Notice | None = None
        self.unreachable = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="spot-watcher", daemon=True)

    def start(self) -> SpotWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.poll_s + 5)

    def _token(self) -> str:
        req = urllib.request.Request(f"{self.endpoint}/latest/api/token", method="PUT",
                                     headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
        with urllib.request.urlopen(req, timeout=2) as resp:
            return resp.read().decode()

    def _get(self, path: str, token: str) -> dict | None:
        req = urllib.request.Request(f"{self.endpoint}/latest/meta-data/{path}",
                                     headers={"X-aws-ec2-metadata-token": token})
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                return json.loads(resp.read().decode() or "{}")
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise

    def check(self) -> Notice | None:
        """One poll: a notice, or None."""
        token = self._token()
        action = self._get("spot/instance-action", token)
        if action is not None:
            return Notice("instance-action", action)
        if self.include_rebalance:
            rebalance = self._get("events/recommendations/rebalance", token)
            if rebalance is not None:
                return Notice("rebalance", rebalance)
        return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                notice = self.check()
            except (urllib.error.URLError, OSError, ValueError) as exc:
                if not self.unreachable:
                    print(f"[privlm] spot watcher: metadata service unreachable at {self.endpoint} ({exc}); "
                          "polling on", flush=True)
                self.unreachable = True
                notice = None
            if notice is not None:
                self.notice = notice
                self.on_notice(notice)
                return
            self._stop.wait(self.poll_s)
