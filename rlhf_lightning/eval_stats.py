"""Statistics of the ``evaluate`` command: pure functions of scores and counts, no models.

- :func:`pass_at_k`: the unbiased pass@k estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained
  on Code", arXiv 2107.03374, section 2.1): with ``n`` samples of which ``c`` pass,
  ``pass@k = 1 - C(n-c, k) / C(n, k)``, the probability that at least one of ``k`` samples drawn without
  replacement from the ``n`` passes. Computed as the paper's numerically stable product
  ``1 - prod_{i=n-c+1}^{n} (1 - k / i)`` (binomials of large ``n`` overflow floats).
- :func:`outcomes` / :func:`win_rate`: per-prompt win (1), tie (0.5) or loss (0) of model A against model B from
  their scores on the same prompts, and the win rate ``(wins + ties / 2) / N`` with a 95% confidence interval.

The default interval is Wilson's score interval (E. B. Wilson 1927, "Probable inference, the law of succession,
and statistical inference", JASA 22:209-212) with each tie counted as half a win, i.e. on ``wins + ties / 2``
successes out of ``N``. Brown, Cai & DasGupta 2001 ("Interval estimation for a binomial proportion", Statistical
Science 16:101-133) recommend it over the normal (Wald) interval: it stays inside [0, 1], does not collapse to a
point at 0% or 100%, and keeps near-nominal coverage for small ``N``. With ties it is conservative: a per-prompt
outcome in [0, 1] with mean p has variance at most p(1 - p), the Bernoulli variance Wilson assumes (a tie has
none). ``method="normal"`` gives the normal approximation on the per-prompt mean instead (mean +- z * s / sqrt(N),
s the sample standard deviation of the outcomes), which uses the observed variance but degenerates to a point when
every outcome is equal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

WIN, TIE, LOSS = 1.0, 0.5, 0.0


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt from ``n`` samples, ``c`` of them passing (Chen et al. 2021, eq. 1)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}.")
    if n - c < k:  # every draw of k samples contains a passing one
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(passed: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over prompts; ``passed[p]`` says which of prompt ``p``'s samples pass."""
    if not passed:
        raise ValueError("pass@k of no prompts.")
    return sum(pass_at_k(len(row), sum(map(bool, row)), k) for row in passed) / len(passed)


def outcomes(scores_a: Sequence[float], scores_b: Sequence[float], tie_margin: float = 0.0) -> list[float]:
    """Per-prompt outcome of A against B: 1 (A's score higher by more than ``tie_margin``), 0.5 (a tie:
    ``|a - b| <= tie_margin``; with the default 0 only exactly equal scores, e.g. identical answers) or 0."""
    if len(scores_a) != len(scores_b):
        raise ValueError(f"{len(scores_a)} scores of A for {len(scores_b)} scores of B: they must be paired.")
    if tie_margin < 0:
        raise ValueError(f"tie_margin must be >= 0; got {tie_margin}.")
    pairs = zip(scores_a, scores_b, strict=True)
    return [TIE if abs(a - b) <= tie_margin else WIN if a > b else LOSS for a, b in pairs]


def z_value(confidence: float) -> float:
    """The two-sided standard normal quantile of ``confidence`` (1.959964 for 0.95)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}.")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a proportion of ``successes`` out of ``n`` (ties may count 0.5)."""
    if n <= 0:
        raise ValueError("Wilson interval of no trials.")
    z, p = z_value(confidence), successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def normal_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Normal-approximation interval of a mean: ``mean +- z * s / sqrt(N)`` (s with N - 1 degrees of freedom),
    clipped to [0, 1] (outcomes are in [0, 1]); a single value gives the point itself."""
    n = len(values)
    if n == 0:
        raise ValueError("Normal interval of no values.")
    mean = sum(values) / n
    spread = z_value(confidence) * math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else 0.0
    return max(0.0, mean - spread), min(1.0, mean + spread)


def win_rate(per_prompt: Sequence[float], method: str = "wilson", confidence: float = 0.95) -> dict[str, Any]:
    """Win rate ``(wins + ties / 2) / N`` of per-prompt outcomes (see :func:`outcomes`) with its interval
    (``method``: ``wilson`` or ``normal``, see the module docstring) and the win/tie/loss counts."""
    n = len(per_prompt)
    if n == 0:
        raise ValueError("Win rate of no prompts.")
    wins, ties = sum(o == WIN for o in per_prompt), sum(o == TIE for o in per_prompt)
    rate = (wins + ties / 2) / n
    if method == "wilson":
        low, high = wilson_interval(wins + ties / 2, n, confidence)
    elif method == "normal":
        low, high = normal_interval(per_prompt, confidence)
    else:
        raise ValueError(f"Unknown confidence-interval method '{method}': use 'wilson' or 'normal'.")
    return {"win_rate": rate, "ci_low": low, "ci_high": high, "wins": wins, "ties": ties,
            "losses": n - wins - ties, "n": n, "ci_method": method, "confidence": confidence}
