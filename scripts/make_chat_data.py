"""Write the demo chat and preference sets (English and Chinese) under recipes/data/, deterministically.

    python scripts/make_chat_data.py     # rewrites recipes/data/chat/*.jsonl and recipes/data/preference/*.jsonl

Short conversations written for the project: arithmetic with worked answers, what Python built-ins do, and
what privlm's stations do. Preference pairs prefer the correct, polite answer in the user's language over a
wrong sum, an off-topic reply or a reply in the other language. Every 8th sample is held out (heldout.jsonl).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "recipes" / "data"
SYSTEM_EN = "You are a concise assistant for a private LLM team."
SYSTEM_ZH = "你是一个简洁的助手，为私有化大模型团队服务。"
REFUSAL = {False: "I don't know, look it up yourself.", True: "我不知道，你自己查吧。"}

BUILTINS = [  # name, English, Chinese, an example call on xs (a short list of ints)
    ("len", "returns the number of items in a container", "返回容器中元素的个数", "len({xs})"),
    ("sorted", "returns a new sorted list from any iterable", "把任意可迭代对象排序后返回一个新列表", "sorted({xs})"),
    ("sum", "adds up the numbers of an iterable", "把可迭代对象里的数字加起来", "sum({xs})"),
    ("max", "returns the largest item", "返回最大的元素", "max({xs})"),
    ("min", "returns the smallest item", "返回最小的元素", "min({xs})"),
    ("reversed", "iterates over a sequence backwards", "从后往前遍历一个序列", "list(reversed({xs}))"),
    ("enumerate", "yields (index, item) pairs", "依次给出（下标，元素）对", "list(enumerate({xs}))[:2]"),
    ("set", "builds a set, which drops repeated items", "构造一个集合，去掉重复的元素", "len(set({xs}))"),
]
BUILTIN_CALLS = {"len": len, "sorted": sorted, "sum": sum, "max": max, "min": min, "list": list,
                 "reversed": reversed, "enumerate": enumerate, "set": set}
STATIONS = [  # station, English, Chinese
    ("jobs/data", "cleans, deduplicates, redacts and packs the training data", "清洗、去重、脱敏并打包训练数据"),
    ("jobs/train", "trains the model with DeepSpeed and writes exact-resume checkpoints",
     "用 DeepSpeed 训练模型并写出可精确恢复的检查点"),
    ("mlops", "tracks runs in MLflow and promotes models by alias", "在 MLflow 中记录实验并按别名晋升模型"),
    ("serving", "serves the model with vLLM behind our gateway", "通过我们的网关用 vLLM 提供模型服务"),
    ("cost", "estimates GPU-hours and the cost of training and serving", "估算训练和推理所需的 GPU 小时与成本"),
]
STATION_QUESTIONS = (("What does {name} do in privlm?", "privlm 里的 {name} 负责什么？"),
                     ("Which job does {name} have?", "{name} 是做什么的？"),
                     ("Explain {name} in one sentence.", "用一句话解释 {name}。"))


def arithmetic(rng: random.Random, zh: bool) -> tuple[str, str, str]:
    """(question, right answer, wrong answer)."""
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
    if zh:
        return f"{a} 加 {b} 等于多少？", f"{a} + {b} = {a + b}。", f"{a} + {b} = {wrong}。"
    return f"What is {a} plus {b}?", f"{a} + {b} = {a + b}.", f"{a} + {b} = {wrong}."


def builtin(rng: random.Random, zh: bool) -> tuple[str, str]:
    """A question about a built-in with an example call, and its answer with the call's result."""
    name, en, cn, call = rng.choice(BUILTINS)
    xs = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    expr = call.format(xs=xs)
    result = eval(expr, {"__builtins__": {}}, BUILTIN_CALLS)  # our own fixed expressions
    if zh:
        return f"Python 的 {name}() 是做什么的？比如 {expr}", f"{name}() {cn}。{expr} 的结果是 {result}。"
    return f"What does Python's {name}() do, e.g. {expr}?", f"{name}() {en}; {expr} gives {result}."


def stations(zh: bool) -> list[tuple[str, str]]:
    """Every (question, answer) about privlm's stations in one language."""
    out = []
    for name, en, cn in STATIONS:
        for q_en, q_zh in STATION_QUESTIONS:
            out.append((q_zh.format(name=name), f"{name} {cn}。") if zh else
                       (q_en.format(name=name), f"{name} {en}."))
    return out


def _chat(q: str, a: str, i: int, zh: bool, rng: random.Random) -> dict:
    if i % 5 == 0:  # the prompt/response form
        return {"prompt": q, "response": a}
    messages = [{"role": "system", "content": SYSTEM_ZH if zh else SYSTEM_EN}] if i % 4 == 0 else []
    messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if i % 7 == 0:  # a follow-up turn
        q2, a2, _ = arithmetic(rng, zh)
        messages += [{"role": "user", "content": q2}, {"role": "assistant", "content": a2}]
    return {"messages": messages}


def chat_samples(n: int = 320) -> list[dict]:
    rng = random.Random(17)
    pairs = [(q, a, zh) for zh in (False, True) for q, a in stations(zh)]
    while len(pairs) < n:
        zh = len(pairs) % 2 == 1
        if len(pairs) % 2:
            q, a = builtin(rng, zh)
        else:
            q, a, _ = arithmetic(rng, zh)
        pairs.append((q, a, zh))
    rng.shuffle(pairs)
    return [_chat(q, a, i, zh, rng) for i, (q, a, zh) in enumerate(pairs)]


def preference_pairs(n: int = 240) -> list[dict]:
    rng = random.Random(1717)
    out = []
    other = {zh: dict(zip([q for q, _ in stations(zh)], [a for _, a in stations(not zh)], strict=True))
             for zh in (False, True)}
    station_pairs = [(q, a, zh) for zh in (False, True) for q, a in stations(zh)]
    for i in range(n):
        zh = i % 2 == 1
        if i < len(station_pairs):
            q, chosen, zh = station_pairs[i]
            rejected = other[zh][q] if i % 2 else REFUSAL[zh]
        elif i % 2:
            q, chosen, rejected = arithmetic(rng, zh)
        else:
            q, chosen = builtin(rng, zh)
            rejected = REFUSAL[zh]
        prompt: str | list[dict] = q
        if i % 6 == 0:
            prompt = [{"role": "system", "content": SYSTEM_ZH if zh else SYSTEM_EN}, {"role": "user", "content": q}]
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    rng.shuffle(out)
    return out


def write(folder: Path, records: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, keep in (("train.jsonl", lambda i: i % 8 != 7), ("heldout.jsonl", lambda i: i % 8 == 7)):
        lines = [json.dumps(r, ensure_ascii=False) for i, r in enumerate(records) if keep(i)]
        (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write(ROOT / "chat", chat_samples())
    write(ROOT / "preference", preference_pairs())
