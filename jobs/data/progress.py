"""Rich progress bars for the data stages, and a process pool whose workers report progress to them."""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from contextlib import contextmanager
from multiprocessing import get_context
from typing import Any

Advance = Callable[[int], None]

_worker_queue: Any = None


class Bar:
    """One stage's bar: call it to advance by n; `done()` fills it (a total may be an estimate)."""

    def __init__(self, progress: Any | None, task: Any = None) -> None:
        self._progress, self._task = progress, task

    def __call__(self, n: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def done(self) -> None:
        if self._progress is not None:
            total = next(t for t in self._progress.tasks if t.id == self._task).total or 1
            self._progress.update(self._task, completed=total, total=total)


class Stages:
    """Makes one bar per stage on a shared rich Progress (or silent bars without one)."""

    def __init__(self, progress: Any | None) -> None:
        self._progress = progress

    def stage(self, label: str, total: float | None, unit: str = "") -> Bar:
        if self._progress is None:
            return Bar(None)
        return Bar(self._progress, self._progress.add_task(label, total=total, unit=unit))


@contextmanager
def stage_bars(console: Any | None, enabled: bool = True) -> Iterator[Stages]:
    """Progress bars on `console` for the duration of the block (silent ones when disabled)."""
    if not enabled:
        yield Stages(None)
        return
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
    from rich.text import Text

    class Count(ProgressColumn):
        """done/total in the stage's unit: bytes as MB, anything else as a count."""

        def render(self, task: Any) -> Text:
            unit, done, total = task.fields.get("unit", ""), task.completed, task.total or 0
            if unit == "bytes":
                return Text(f"{done / 1e6:,.1f}/{total / 1e6:,.1f} MB")
            return Text(f"{done:,.0f}/{total:,.0f} {unit}")

    columns = (TextColumn("[bold]{task.description:<24}"), BarColumn(), Count(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        yield Stages(progress)


def _init_worker(q: Any) -> None:
    global _worker_queue
    _worker_queue = q


def _report_to_queue(n: int) -> None:
    _worker_queue.put(n)


def _run_in_worker(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    return fn(*args, progress=_report_to_queue)


def run_parallel(fn: Callable[..., Any], jobs: Sequence[tuple[Any, ...]], workers: int,
                 advance: Advance) -> list[Any]:
    """fn(*args, progress=...) for each job, in `workers` processes (inline for one); results in job order.

    The first failure cancels the jobs not yet started and is raised here.
    """
    if workers <= 1 or len(jobs) <= 1:
        return [fn(*args, progress=advance) for args in jobs]
    ctx = get_context("spawn")  # no fork of a process holding threads (rich, tokenizers)
    q = ctx.Queue()
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx, initializer=_init_worker,
                             initargs=(q,)) as pool:
        futures = [pool.submit(_run_in_worker, fn, args) for args in jobs]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.1, return_when=FIRST_EXCEPTION)
            _drain(q, advance)
            for fut in done:
                if fut.exception() is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise fut.exception()
        _drain(q, advance)
        return [f.result() for f in futures]


def _drain(q: Any, advance: Advance) -> None:
    while True:
        try:
            advance(q.get_nowait())
        except queue.Empty:
            return
