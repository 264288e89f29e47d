"""Data figures: MB/s per station and end to end, ours against the pipeline of a baseline commit, same run.

Writes benchmarks/results/data.json. The baseline is the tree of `--baseline` (default abc6f86, the pipeline
before Chinese support) extracted with `git archive` into a temporary folder; each tree is measured in its
own interpreter (`--measure`) on the same two corpora:

- stdlib: the tiny-cpu recipe's sources (the Python standard library's own modules);
- zh: Chinese JSONL records made from the demo corpus's sentences (recipes/data/zh), deterministic.

Stations, each timed over every document of a corpus as the pipeline runs it: normalise, language ID, t2s
(on Chinese documents only; the baseline has neither), filters (length + quality), PII, dedup (MinHash
signature, plus band keys and sentence hashes in ours), tokenise (one shared tokenizer), pack. End to end:
`prepare_data` from scratch with one worker, the trees alternating for `--rounds` rounds, the fastest run
kept (on the Chinese corpus with every filter open: the baseline's defaults drop every Chinese document).
Also bytes per token and tokens per character of Chinese held-out text (the validation and test splits of
tiny-cpu-zh) under the tiny-cpu tokenizer of each tree and under the one our pipeline trains for tiny-cpu-zh.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
STATIONS = ("normalise", "language ID", "t2s", "filters", "PII", "dedup", "tokenise", "pack")


def zh_corpus(out: Path, records: int = 3000, seed: int = 7) -> Path:
    """Chinese records of 8-20 sentences drawn from the demo corpus: ~2 MB of ordinary prose."""
    import re

    texts = [json.loads(line).get("text") for line in
             (REPO / "recipes" / "data" / "zh" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    sentences = [s for t in texts if isinstance(t, str) and re.search(r"[\u4e00-\u9fff]", t)
                 for s in re.findall(r"[^。！？\n]+[。！？]", t)]
    rng = random.Random(seed)
    with open(out, "w", encoding="utf-8") as fh:
        for _ in range(records):
            body = "".join(rng.choice(sentences) for _ in range(rng.randrange(8, 21)))
            fh.write(json.dumps({"text": body}, ensure_ascii=False) + "\n")
    return out


def stdlib_texts() -> list[str]:
    from jobs.data.sources import discover, read_documents
    from jobs.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "tiny-cpu.yaml")
    return [d.text for item in discover(recipe.data.sources) for d in read_documents(item)]


def measure_stations(texts: list[str], tokenizer_dir: Path) -> dict[str, float]:
    """Seconds per station over the documents, with whatever the imported tree's pipeline offers."""
    import numpy as np

    from jobs.data import clean, dedup, pii, quality
    from jobs.recipe import PIIConfig, parse_recipe

    recipe = parse_recipe({"name": "b", "data": {"sources": [{"path": "."}]}, "training": {"max_steps": 20}})
    cfg = recipe.data.filters
    try:
        from jobs.data import language
    except ImportError:
        language = None
    seconds = dict.fromkeys(STATIONS, 0.0)

    def timed(station: str, fn: Any, items: list[Any]) -> list[Any]:
        t = time.perf_counter()
        out = [fn(x) for x in items]
        seconds[station] += time.perf_counter() - t
        return out

    docs = timed("normalise", clean.normalize, texts)
    langs = ["und"] * len(docs)
    if language is not None:
        candidates = tuple(sorted(recipe.data.language.candidates))
        langs = timed("language ID", lambda d: language.detect_language(d, candidates), docs)
        zh = [i for i, lang in enumerate(langs) if lang == "zh"]
        converted = timed("t2s", language.to_simplified, [docs[i] for i in zh])
        for i, text in zip(zh, converted, strict=True):
            docs[i] = text
    timed("filters", lambda d: clean.length_reason(d, cfg, len(quality.Doc.of(d).words))
          or quality.quality_reason(d, cfg), docs)
    docs = [t for t, _ in timed("PII", lambda d: pii.redact(d, PIIConfig()), docs)]
    hasher = dedup.MinHasher(128, 5)
    sigs = timed("dedup", hasher.signature, docs)
    if hasattr(dedup, "band_keys"):
        t = time.perf_counter()
        dedup.band_keys(np.stack(sigs), *dedup.lsh_bands(0.8, 128))
        [dedup.sentence_hashes(d, 12) for d in docs if not dedup.is_code(d, "")]
        seconds["dedup"] += time.perf_counter() - t
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    t = time.perf_counter()
    ids = [np.asarray(e.ids, dtype=np.uint16) for e in tok.encode_batch(docs)]
    seconds["tokenise"] = time.perf_counter() - t
    from jobs.data.pack import BlockWriter

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        writer = BlockWriter(Path(tmp), "train", 128, np.dtype("<u2"), 4096)
        for x in ids:
            writer.write(x)
        writer.close()
        seconds["pack"] = time.perf_counter() - t
    return seconds


def measure_end_to_end(corpus: str, zh_file: Path, work: Path) -> dict[str, Any]:
    """`prepare_data` from scratch, one worker, silent: input MB, seconds, MB/s (the report's own figure)."""
    from jobs.data.pipeline import prepare_data
    from jobs.recipe import load_recipe, parse_recipe

    if corpus == "stdlib":
        data = load_recipe(REPO / "recipes" / "tiny-cpu.yaml").model_dump(mode="json", exclude_none=True)
        data["data"] = {k: v for k, v in data["data"].items() if k in ("sources", "num_shards", "eval_fraction",
                                                                        "filters")}
        for src in data["data"]["sources"]:
            src.pop("weight", None), src.pop("record_schema", None)
    else:
        # the baseline's default filters drop every Chinese document (one "word" each): open them for both
        loose = {"min_chars": 0, "min_words": 0, "max_mean_word_length": 1e9, "max_symbol_ratio": 1.0,
                 "max_duplicate_line_fraction": 1.0, "max_top_ngram_fraction": 1.0, "min_alpha_word_fraction": 0.0}
        data = {"name": "zh", "tokenizer": {"vocab_size": 8192},
                "data": {"sources": [{"path": str(zh_file)}], "num_shards": 4, "eval_fraction": 0.02,
                         "filters": loose},
                "training": {"max_steps": 20, "sequence_length": 128, "micro_batch_size": 1, "global_batch_size": 1},
                "model": {"max_position_embeddings": 256}}
    data["name"], data["data"]["workers"], data["data"]["output_dir"] = f"bench-{corpus}", 1, str(work / corpus)
    data.setdefault("training", {})["processes_per_node"] = 1
    data["training"]["micro_batch_size"] = data["training"]["global_batch_size"] = 1
    recipe = parse_recipe(data)
    t = time.perf_counter()
    report = prepare_data(recipe, force=True, progress=False, console=_quiet_console()).report
    seconds = time.perf_counter() - t
    return {"input_mb": report["input_bytes"] / 1e6, "seconds": seconds,
            "mb_per_s": report["input_bytes"] / 1e6 / seconds, "stage_seconds": report["stage_seconds"]}


def _quiet_console() -> Any:
    from rich.console import Console

    return Console(file=open(os.devnull, "w"))


def held_out_chinese(work: Path) -> tuple[str, dict[str, Any]]:
    """Prepare tiny-cpu-zh (ours) and return the Chinese lines of its validation and test splits (text the
    tokenizer never saw), with the report's per-language figures."""
    from jobs.data.pack import PackedDataset, load_tokenizer
    from jobs.data.pipeline import prepare_data
    from jobs.recipe import load_recipe

    recipe = load_recipe(REPO / "recipes" / "tiny-cpu-zh.yaml", [f"data.output_dir={work / 'tiny-cpu-zh'}"])
    report = prepare_data(recipe, force=True, progress=False, console=_quiet_console()).report
    tok = load_tokenizer(recipe.data_path)
    lines = []
    for split in ("eval", "test"):
        ds = PackedDataset(recipe.data_path, split)
        text = tok.decode(ds.get_blocks(range(len(ds))).reshape(-1).tolist()) if len(ds) else ""
        lines += [ln for ln in text.splitlines() if sum("\u4e00" <= c <= "\u9fff" for c in ln) > len(ln) / 2]
    return "\n".join(lines), report["languages"]


def bytes_per_token(tokenizer_dir: Path, text: str) -> dict[str, float]:
    """Bytes per token and tokens per character of `text` (the sequence-length inflation)."""
    from tokenizers import Tokenizer

    n = len(Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).encode(text).ids)
    return {"bytes_per_token": len(text.encode("utf-8")) / n, "tokens_per_char": n / len(text)}


def measure(args: argparse.Namespace) -> None:
    """In the tree on sys.path: every station on both corpora (`--measure stations`), or one end-to-end run
    of one corpus (`--measure stdlib|zh`)."""
    sys.path.insert(0, args.tree)
    work, zh_file = Path(args.work), Path(args.zh)
    if args.measure != "stations":
        print("RESULT " + json.dumps(measure_end_to_end(args.measure, zh_file, work)))
        return
    corpora = {"stdlib": stdlib_texts(),
               "zh": [json.loads(line)["text"] for line in zh_file.read_text(encoding="utf-8").splitlines()]}
    out: dict[str, Any] = {}
    for name, texts in corpora.items():
        mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
        seconds = measure_stations(texts, Path(args.tokenizer))
        out[name] = {"input_mb": mb, "station_seconds": seconds,
                     "station_mb_per_s": {k: (mb / v if v > 0 else None) for k, v in seconds.items()}}
    print("RESULT " + json.dumps(out))


def run_tree(tree: Path, what: str, zh: Path, tokenizer: Path, work: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--measure", what, "--tree", str(tree), "--zh", str(zh), "--tokenizer",
           str(tokenizer), "--work", str(work)]
    env = {**os.environ, "PYTHONPATH": str(tree), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree, timeout=3600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"measuring {tree} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="abc6f86")
    parser.add_argument("--rounds", type=int, default=2, help="end-to-end runs per tree and corpus (best kept)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    for name in ("tree", "zh", "tokenizer", "work"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args)
    sys.path.insert(0, str(REPO))
    from benchmarks.train import machine

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        base = tmp_path / "baseline"
        base.mkdir()
        archive = subprocess.run(["git", "archive", args.baseline], cwd=REPO, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
        zh = zh_corpus(tmp_path / "zh.jsonl")
        # one tokenizer for the tokenise station of both trees: trained on both corpora by today's trainer
        from jobs.data.tokenizer import train_tokenizer

        sample = stdlib_texts()[:200] + [json.loads(x)["text"] for x in zh.read_text().splitlines()[:500]]
        train_tokenizer(sample, 8192, 2, tmp_path / "tokenizer")
        trees = {"baseline": base, "ours": REPO}
        results = {label: run_tree(tree, "stations", zh, tmp_path / "tokenizer", tmp_path / f"work-{label}")
                   for label, tree in trees.items()}
        # end to end: the trees alternate, round after round, and the fastest run of each counts (the machine
        # is shared: a slow run is noise, not the pipeline)
        for _ in range(args.rounds):
            for corpus in ("stdlib", "zh"):
                for label, tree in trees.items():
                    run = run_tree(tree, corpus, zh, tmp_path / "tokenizer", tmp_path / f"work-{label}")
                    runs = results[label][corpus].setdefault("end_to_end_runs", [])
                    runs.append(run)
                    results[label][corpus]["end_to_end"] = min(runs, key=lambda r: r["seconds"])
        text, languages = held_out_chinese(tmp_path)
        tokenizers = {"baseline tiny-cpu tokenizer (stdlib, 8192)": tmp_path / "work-baseline" / "stdlib" / "tokenizer",
                      "ours tiny-cpu tokenizer (stdlib, 8192)": tmp_path / "work-ours" / "stdlib" / "tokenizer",
                      "ours tiny-cpu-zh tokenizer (weighted mix, 8192)": tmp_path / "tiny-cpu-zh" / "tokenizer"}
        chinese = {"held_out_chars": len(text), "report_languages": languages,
                   **{name: bytes_per_token(path, text) for name, path in tokenizers.items()}}
    ratio = {c: results["ours"][c]["end_to_end"]["mb_per_s"] / results["baseline"][c]["end_to_end"]["mb_per_s"]
             for c in ("stdlib", "zh")}
    payload = {"machine": machine(), "baseline_commit": args.baseline, "ours": results["ours"],
               "baseline": results["baseline"], "ratio_end_to_end_mb_per_s": ratio,
               "chinese_tokenizer": chinese,
               "ratio_station_mb_per_s": {c: {k: (results["ours"][c]["station_mb_per_s"][k] /
                                                  results["baseline"][c]["station_mb_per_s"][k])
                                              if results["baseline"][c]["station_mb_per_s"][k] and
                                              results["ours"][c]["station_mb_per_s"][k] else None
                                              for k in STATIONS} for c in ("stdlib", "zh")},
               "target_ratio_stdlib": 0.8, "meets_target": ratio["stdlib"] >= 0.8}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "data.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps({"ratio_end_to_end_mb_per_s": ratio, "ratio_station_mb_per_s": payload["ratio_station_mb_per_s"],
                      "chinese_tokenizer": {k: v for k, v in chinese.items() if k != "report_languages"}}, indent=1))


if __name__ == "__main__":
    main()
