"""`privlm data prepare`: the data stations in order, sharded, with a manifest and a report.

    plan_shards     discover the inputs, fingerprint them with the settings, assign files to shards
    process_shard   per shard, in its own process: normalise, language ID and t2s, length and quality filters
                    (per language), PII redaction, schema quarantine, SHA-256, MinHash signatures and their
                    LSH band keys, prose sentence hashes                                 (jobs.data.shard)
    dedup_bucket    per bucket of band keys and sentence hashes, in its own process: verified similar pairs,
                    sentences found in several documents                               (jobs.data.buckets)
    finalize        once: exact + near dedup decisions from the buckets' results, repeated sentences, the
                    stratified split, tokenizer, tokenization per shard, weighted packing, index, manifest,
                    report; then the output directory is published                        (jobs.data.merge)

`prepare_data` runs them here, shards and buckets in a process pool of data.workers. On a cluster, run
`plan_shards` once, `process_shard(recipe, i, work_dir)` as array task i, `dedup_bucket(recipe, j, work_dir)`
as task j of a second array, then `finalize(recipe, work_dir)` (which runs any bucket not yet done).

data.format chat and preference skip all of this: `prepare_data` hands them to `jobs.data.chat.prepare_records`.

Files: the work files live in `<data_path>.work/` until the output is published; the output is built in
`<data_path>.tmp/` and renamed into place, so a failed run leaves the previous output as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jobs.data.manifest import MANIFEST, QUARANTINE, REPORT, current_manifest, fingerprint, settings_hash
from jobs.data.buckets import dedup_bucket
from jobs.data.progress import Stages, run_parallel, stage_bars
from jobs.data.shard import as_recipe, check_plan, process_shard, shard_dir, tokenize_shard
from jobs.data.sources import InputFile, discover
from jobs.files import atomic_write_text, fsync_dir, replace_dir
from jobs.recipe import Recipe


@dataclass
class PrepareResult:
    """Where the shards are, whether the run was skipped as up to date, and its report."""

    output_dir: Path
    skipped: bool
    fingerprint: str
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """The sharding of one run; `current` when the output already matches and nothing needs doing."""

    work_dir: Path
    fingerprints: dict[str, Any]
    num_shards: int
    input_bytes: int
    current: bool

    @property
    def fingerprint(self) -> str:
        return self.fingerprints["fingerprint"]


class OutputDirError(ValueError):
    """data.output_dir points at something privlm must not replace."""


def work_dir_of(recipe: Recipe) -> Path:
    return Path(f"{recipe.data_path}.work")


def _tmp_dir_of(recipe: Recipe) -> Path:
    return Path(f"{recipe.data_path}.tmp")


def check_output_dir(out: Path) -> None:
    """Restore an output whose replacement was interrupted; refuse to replace a directory that is not ours."""
    old = out.with_name(f".{out.name}.old")
    if not out.exists() and old.is_dir():
        os.rename(old, out)  # the crash came between the two renames of replace_dir
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "index.json").is_file())):
        raise OutputDirError(f"data.output_dir={str(out)!r} exists and is not a prepared data directory; "
                             "choose another data.output_dir or move it away")


def plan_shards(recipe: Recipe, force: bool = False) -> Plan:
    """Discover inputs, fingerprint them, and (unless the output is current) write the shard plan.

    The work directory of an interrupted run with the same fingerprint is kept, so its finished shards are
    not redone; any other is replaced.
    """
    if recipe.data.format != "text":
        raise ValueError(f"data.format={recipe.data.format!r} is prepared in one pass, not in shards: run "
                         "`privlm data prepare RECIPE` (jobs.data.chat.prepare_records)")
    out = recipe.data_path
    check_output_dir(out)
    inputs = discover(recipe.data.sources)
    fps = fingerprint(recipe, inputs)
    n = recipe.data.num_shards
    total = sum(x.size for x in inputs)
    work = work_dir_of(recipe)
    if not force and current_manifest(out, fps["fingerprint"]) is not None:
        return Plan(work, fps, n, total, current=True)
    plan_file = work / "plan.json"
    if force or not plan_file.is_file() or json.loads(plan_file.read_text()).get("fingerprint") != fps["fingerprint"]:
        shutil.rmtree(work, ignore_errors=True)
    shards: list[list[InputFile]] = [[] for _ in range(n)]
    for item in inputs:
        shards[item.shard(n)].append(item)
    for i, items in enumerate(shards):
        shard_dir(work, i).mkdir(parents=True, exist_ok=True)
        (shard_dir(work, i) / "inputs.json").write_text(json.dumps([asdict(x) for x in items]))
    plan = {"fingerprint": fps["fingerprint"], "fingerprints": fps, "settings": settings_hash(recipe),
            "num_shards": n, "input_bytes": total, "recipe": recipe.model_dump(mode="json")}
    atomic_write_text(plan_file, json.dumps(plan, indent=1))
    return Plan(work, fps, n, total, current=False)


def _inputs(work_dir: Path, num_shards: int) -> list[InputFile]:
    items = [InputFile(**x) for s in range(num_shards)
             for x in json.loads((shard_dir(work_dir, s) / "inputs.json").read_text())]
    return sorted(items, key=lambda x: (x.source, x.rel))


def _shard_stats(work_dir: Path, num_shards: int) -> list[dict[str, Any]]:
    return [json.loads((shard_dir(work_dir, s) / "clean" / "stats.json").read_text()) for s in range(num_shards)]


def finalize(recipe: Recipe | str | Path, work_dir: str | Path, bars: Stages | None = None,
             seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """The global pass once every shard is processed: dedup, tokenizer, packing, manifest, report, publish.

    Reads only the work directory (and the recipe), so on a cluster it runs as its own job after the array
    of `process_shard` tasks; the work directory is removed once the output is published.
    """
    from jobs.data.merge import build_tokenizer, deduplicate

    recipe, work_dir = as_recipe(recipe), Path(work_dir)
    plan = check_plan(recipe, work_dir)
    bars = bars or Stages(None)
    seconds = dict(seconds or {"clean": sum(s["seconds"] for s in _shard_stats(work_dir, plan["num_shards"]))})
    stats = _shard_stats(work_dir, plan["num_shards"])
    kept = sum(s["kept"]["pii redaction"][0] for s in stats)

    t = time.perf_counter()
    for b in range(plan["num_shards"]):  # done by the bucket array on a cluster: then each is skipped
        dedup_bucket(recipe, b, work_dir)
    bar = bars.stage("deduplicate", kept, "docs")
    dedup = deduplicate(recipe, work_dir, bar)
    bar.done()
    seconds["dedup"] = seconds.get("dedup", 0.0) + time.perf_counter() - t
    t = time.perf_counter()
    if dedup["train"]["docs"] + dedup["eval"]["docs"] + dedup["test"]["docs"] == 0:
        raise ValueError("every document was filtered out; loosen data.filters or check data.sources "
                         f"(drop reasons per shard in {work_dir}/shard-*/clean/stats.json)")
    train_docs = dedup["train"]["docs"] if not recipe.tokenizer.path else 0
    bar = bars.stage("train tokenizer", train_docs, "docs") if train_docs else bars.stage("copy tokenizer", 1)
    tokenizer = build_tokenizer(recipe, work_dir, bar)
    bar.done()
    seconds["tokenizer"], t = time.perf_counter() - t, time.perf_counter()
    kept_bytes = sum(dedup[name]["bytes"] for name in ("train", "eval", "test"))
    bar = bars.stage("tokenize", kept_bytes, "bytes")
    for s in range(plan["num_shards"]):  # the tokenizer's own threads use every core
        tokenize_shard(recipe, s, work_dir, progress=bar)
    bar.done()
    seconds["tokenize"] = time.perf_counter() - t
    report = _pack_and_publish(recipe, work_dir, plan, stats, dedup, tokenizer, bars, seconds)
    shutil.rmtree(work_dir, ignore_errors=True)
    return report


def _pack_and_publish(recipe: Recipe, work_dir: Path, plan: dict[str, Any], stats: list[dict[str, Any]],
                      dedup: dict[str, Any], tokenizer: dict[str, Any], bars: Stages,
                      seconds: dict[str, float]) -> dict[str, Any]:
    """Pack into `<data_path>.tmp`, write index, report and manifest there, then rename it into place."""
    from jobs.data.manifest import build_manifest
    from jobs.data.merge import pack
    from jobs.data.pack import write_index
    from jobs.data.report import build_report

    t = time.perf_counter()
    out, tmp = recipe.data_path, _tmp_dir_of(recipe)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        kept = sum(dedup[name]["docs"] for name in ("train", "eval", "test"))
        bar = bars.stage("pack", kept, "docs")
        packed = pack(recipe, work_dir, tmp, tokenizer, bar)
        bar.done()
        shutil.copytree(work_dir / "tokenizer", tmp / "tokenizer")
        _write_quarantine(work_dir, plan["num_shards"], tmp / QUARANTINE)
        index = write_index(tmp, packed["dtype"], recipe.training.sequence_length, tokenizer["vocab_size"],
                            tokenizer["eos_id"], packed["index"])
        seconds["pack"] = time.perf_counter() - t
        report = build_report(recipe.name, stats, dedup, tokenizer, packed, seconds, index["block_size"])
        manifest = build_manifest(recipe, _inputs(work_dir, plan["num_shards"]), plan["fingerprints"], report, index)
        atomic_write_text(tmp / REPORT, json.dumps(report, indent=1))
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        fsync_dir(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _write_quarantine(work_dir: Path, num_shards: int, out: Path) -> None:
    """Every shard's quarantined records in (source, path, record) order, in one JSONL file (none: no file)."""
    records = []
    for s in range(num_shards):
        path = shard_dir(work_dir, s) / "clean" / "quarantine.jsonl"
        if path.is_file():
            records += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    if records:
        records.sort(key=lambda r: (r["source"], r["path"], r["record"]))
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def prepare_data(recipe: Recipe, force: bool = False, console: Any = None, progress: bool = True) -> PrepareResult:
    """Run the whole pipeline for a recipe, or skip it when the output matches the inputs and settings."""
    from rich.console import Console

    if recipe.data.format != "text":  # chat and preference records: one pass, no sharding (jobs.data.chat)
        from jobs.data.chat import prepare_records

        return prepare_records(recipe, force, console)
    console = console or Console()
    started = time.perf_counter()
    plan = plan_shards(recipe, force)
    out = recipe.data_path
    if plan.current:
        report = json.loads((out / REPORT).read_text())
        console.print(f"{out} is up to date (inputs and settings unchanged, fingerprint {plan.fingerprint}): "
                      "skipping; use --force to rebuild", soft_wrap=True, highlight=False)
        return PrepareResult(out, skipped=True, fingerprint=plan.fingerprint, report=report)
    with stage_bars(console, progress) as bars:
        jobs = [(recipe, s, plan.work_dir) for s in range(plan.num_shards)]
        bar = bars.stage("clean, filter, redact", plan.input_bytes, "bytes")
        run_parallel(process_shard, jobs, recipe.data.workers, bar)
        bar.done()
        seconds = {"clean": time.perf_counter() - started}
        t = time.perf_counter()
        bar = bars.stage("dedup buckets", plan.num_shards, "buckets")
        run_parallel(dedup_bucket, jobs, recipe.data.workers, bar)
        bar.done()
        seconds["dedup"] = time.perf_counter() - t
        report = finalize(recipe, plan.work_dir, bars, seconds)
    from jobs.data.report import print_report

    print_report(report, str(out), console)
    return PrepareResult(out, skipped=False, fingerprint=plan.fingerprint, report=report)
