"""A/B statistics on production feedback: champion against challenger.

Per arm (the version that answered): the number of rated answers, their mean score and standard
deviation; Welch's t-test (scipy, unequal variances) for the difference; Cohen's d with the mean of
the two variances as effect size; and the sample size per arm a test at `alpha` needs to detect
`min_effect` with `power` (normal approximation). A challenger wins only when the test is
significant, it is the better arm, and both arms have the minimum sample.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from jobs.recipe import ABPolicy
from mlops.feedback import FeedbackStore
from mlops.registry import RegistryError


@dataclass(frozen=True)
class Arm:
    version: str
    n: int
    mean: float | None
    sd: float | None


@dataclass(frozen=True)
class Comparison:
    champion: Arm
    challenger: Arm
    t: float | None
    p_value: float | None
    effect_size: float | None      # Cohen's d, challenger minus champion
    min_n: int                     # per arm, for min_effect at alpha and power
    alpha: float
    enough_data: bool
    significant: bool
    challenger_better: bool

    @property
    def challenger_wins(self) -> bool:
        return self.enough_data and self.significant and self.challenger_better

    def verdict(self) -> str:
        c, h = self.champion, self.challenger
        numbers = (f"challenger {h.version} mean {_f(h.mean)} (n={h.n}) vs champion {c.version} mean {_f(c.mean)} "
                   f"(n={c.n}): Welch t={_f(self.t)}, p={_f(self.p_value)}, d={_f(self.effect_size)}")
        if not self.enough_data:
            return f"{numbers}; not enough data: {self.min_n} rated answers per arm are needed"
        if not self.significant:
            return f"{numbers}; not significant at alpha={self.alpha}"
        return f"{numbers}; {'the challenger' if self.challenger_better else 'the champion'} is significantly better"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "challenger_wins": self.challenger_wins, "verdict": self.verdict()}


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def min_sample_size(policy: ABPolicy) -> int:
    """Answers per arm for a two-sided test at alpha to detect an effect of min_effect with the power."""
    from scipy.stats import norm

    z = norm.ppf(1 - policy.alpha / 2) + norm.ppf(policy.power)
    return math.ceil(2 * (z / policy.min_effect) ** 2)


def _arm(version: str, scores: list[float]) -> Arm:
    n = len(scores)
    mean = sum(scores) / n if n else None
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1)) if n > 1 else None
    return Arm(version, n, mean, sd)


def compare_scores(champion: tuple[str, list[float]], challenger: tuple[str, list[float]],
                   policy: ABPolicy) -> Comparison:
    """The comparison of two arms' scores, (version, scores) each."""
    from scipy.stats import ttest_ind

    a, b = _arm(*champion), _arm(*challenger)
    t = p = d = None
    if a.n > 1 and b.n > 1:
        res = ttest_ind(challenger[1], champion[1], equal_var=False)
        t, p = float(res.statistic), float(res.pvalue)
        if math.isnan(p):  # both arms constant: no evidence either way
            t = p = None
        pooled = math.sqrt((a.sd ** 2 + b.sd ** 2) / 2)
        d = (b.mean - a.mean) / pooled if pooled > 0 else None
    n_min = min_sample_size(policy)
    return Comparison(a, b, t, p, d, n_min, policy.alpha, min(a.n, b.n) >= n_min,
                      p is not None and p < policy.alpha,
                      b.mean is not None and a.mean is not None and b.mean > a.mean)


def compare_versions(store: FeedbackStore, model: str, champion: str, challenger: str, policy: ABPolicy,
                     since: float | None = None) -> Comparison:
    """Champion and challenger version labels (e.g. NAME/v1) compared on their rated answers."""
    rated = store.rated(model, [champion, challenger], since)
    if not rated:
        raise RegistryError(f"no rated answers of {model} ({champion} or {challenger}) are in the feedback store; "
                            "send ratings to POST /v1/feedback with A/B on (ab.enabled: true)")
    by = {champion: [r.score for r in rated if r.version == champion],
          challenger: [r.score for r in rated if r.version == challenger]}
    return compare_scores((champion, by[champion]), (challenger, by[challenger]), policy)
