"""Paired, interleaved timing: how much slower one training step is than another, with a 95%
interval.

Why this module exists. On a shared machine the same benchmark run twice gave step-time ratios 1.04
(range
0.81-1.12) and 1.13 (0.78-1.23); runs timed one after another in a sweep gave a `none` run
"overheads" from -92%
to +461% against an identical `none` run. A time overhead means something only when both arms are
timed in the
same process, on the same batches, close together in time, and reported with an interval. This
estimator does
that:

- design: the arms A (the strategy) and B (the baseline) alternate within each round in the order A
B B A, the
  next round B A A B, and so on. The positions of A and B in a round have the same mean, so a drift
  that is linear
  in time (thermal throttling, a neighbour process ramping up) adds the same amount to both arms'
  sums and, being
  multiplicative in step time, cancels from their ratio. A sequential design (every A, then every B)
  puts the
  whole drift into the ratio (tests/unit/test_timing.py shows both with a fake clock).
- estimate: one ratio per round, (a1 + a2) / (b1 + b2); the reported ratio is the median of the
round ratios,
  robust to the bursts other processes cause.
- interval: the distribution-free confidence interval for a median from order statistics (the
sign-test
  interval): with n round ratios sorted, [r_(k), r_(n-k+1)] covers the true median with probability
  1 - 2 P(Bin(n, 1/2) <= k - 1), for any continuous distribution of independent round ratios; k is
  the largest
  rank that keeps this >= 95%. It needs n >= 6 (at n = 6 the interval is [min, max], 96.9%); with
  fewer rounds
  the interval is None. Its coverage is exact, not asymptotic, and slightly conservative (95.9% at n
  = 20).
- stopping: after ``min_rounds`` the rounds stop once the interval's width relative to the ratio is
at most
  ``target_rel_width``, or at ``max_rounds`` / ``max_seconds``, whichever comes first. Stopping on
  the width
  makes the interval a little optimistic when the cap is generous; the caps keep the cost known.

Who uses it: ``recompute_lab.measure.overhead`` (the in-run measurement that gives results.json
``time.overhead``),
experiments/bench_overhead.py (framework vs a bare loop), bench_probe.py (probe on vs off) and the
analysis's
wording (``describe``: "within noise (+-x%)" for an interval that contains 1). Pure Python: no torch
import, the
arms are callables that return their own step time (CUDA events on GPU, perf_counter on CPU, a fake
clock in
tests).

Layer: measure, primitives (importable from every layer above config, predict and model).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

CONFIDENCE = 0.95
MIN_ROUNDS_FOR_CI = (
    6  # 2 * 0.5 ** 6 = 3.1% <= 5%: the smallest n whose [min, max] is a 95% interval
)
DESIGNS = ("abba", "random", "sequential")
METHOD = (
    "paired interleaved {design} rounds in one process, same batches; ratio = median over rounds "
    "of "
    "sum(A) / sum(B); 95% CI = distribution-free order-statistic interval of the median (sign test)"
)


def order_statistic_rank(n: int, confidence: float = CONFIDENCE) -> Optional[int]:
    """The 1-based rank k whose interval [x_(k), x_(n-k+1)] covers the median with probability >=
    confidence
    (the largest such k), or None when even [min, max] falls short (n too small)."""
    alpha = 1.0 - confidence
    tail, best = 0.0, None  # tail = P(Bin(n, 1/2) <= k - 1)
    for k in range(1, n // 2 + 1):
        tail += math.comb(n, k - 1) / 2**n
        if 2 * tail > alpha:
            break
        best = k
    return best


def coverage(n: int, confidence: float = CONFIDENCE) -> Optional[float]:
    """The exact coverage of the order-statistic interval for n values (None without an
    interval)."""
    k = order_statistic_rank(n, confidence)
    if k is None:
        return None
    return 1.0 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n


def median_ci(
    values: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, Optional[float], Optional[float]]:
    """(median, low, high) of ``values``; low and high are None with fewer than
    ``MIN_ROUNDS_FOR_CI`` values."""
    if not values:
        raise ValueError("median_ci needs at least one value")
    s = sorted(values)
    k = order_statistic_rank(len(s), confidence)
    med = statistics.median(s)
    if k is None:
        return med, None, None
    return med, s[k - 1], s[len(s) - k]


def relative_width(ratio: float, low: Optional[float], high: Optional[float]) -> float:
    """Width of the interval relative to the estimate (inf without an interval)."""
    if low is None or high is None or ratio <= 0:
        return math.inf
    return (high - low) / ratio


@dataclass
class Paired:
    """What a paired measurement found. ``ratio`` = A's step time / B's (median of per-round
    ratios)."""

    ratio: Optional[float]
    ci95_low: Optional[float]
    ci95_high: Optional[float]
    rounds: int
    method: str
    ratios: list[float] = field(default_factory=list)
    a_step_s: Optional[float] = None  # median step time of each arm over the measured rounds
    b_step_s: Optional[float] = None
    seconds: float = 0.0  # wall time the rounds took (their cost), warmup included
    stopped: str = ""  # target_width | max_rounds | max_seconds | interrupted

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def covers_one(self) -> bool:
        return self.ci95_low is not None and self.ci95_low <= 1.0 <= self.ci95_high


def summarize(ratios: Sequence[float], method: str, **extra) -> Paired:
    """A Paired from per-round ratios measured elsewhere (e.g. one ratio per pair of whole runs)."""
    ratio, lo, hi = median_ci(ratios)
    return Paired(ratio, lo, hi, len(ratios), method, list(ratios), **extra)


def _round_order(design: str, i: int, rng: random.Random) -> str:
    if design == "abba":
        return "ABBA" if i % 2 == 0 else "BAAB"
    if design == "random":
        return rng.choice(("AB", "BA"))
    raise ValueError(f"unknown design {design!r}; valid: {', '.join(DESIGNS)}")


def run_paired(
    step_a: Callable[[int], float],
    step_b: Callable[[int], float],
    *,
    min_rounds: int = 10,
    max_rounds: int = 30,
    target_rel_width: float = 0.05,
    max_seconds: Optional[float] = None,
    warmup_rounds: int = 1,
    design: str = "abba",
    clock: Callable[[], float] = time.perf_counter,
    should_stop: Optional[Callable[[], bool]] = None,
    seed: int = 0,
) -> Paired:
    """Time ``step_a`` against ``step_b`` in interleaved rounds; each call runs one step for round
    ``i`` (the
    same index for both arms: the same batches) and returns its duration in seconds.

    ``design``: "abba" (ABBA, BAAB, ...: cancels linear drift), "random" (AB or BA per round,
    seeded) or
    "sequential" (every A round, then every B round: the naive design, here for comparison; runs
    ``max_rounds``).
    ``warmup_rounds`` rounds run first and are not counted. ``clock`` measures the time budget only.
    """
    if design not in DESIGNS:
        raise ValueError(f"unknown design {design!r}; valid: {', '.join(DESIGNS)}")
    if not 1 <= min_rounds <= max_rounds:
        raise ValueError(f"need 1 <= min_rounds ({min_rounds}) <= max_rounds ({max_rounds})")
    rng = random.Random(seed)
    arms = {"A": step_a, "B": step_b}
    start = clock()
    for w in range(warmup_rounds):
        step_a(-1 - w)
        step_b(-1 - w)
    if design == "sequential":
        a = [step_a(i) for i in range(max_rounds)]
        b = [step_b(i) for i in range(max_rounds)]
        res = summarize(
            [x / y for x, y in zip(a, b)],
            METHOD.format(design=design),
            a_step_s=statistics.median(a),
            b_step_s=statistics.median(b),
        )
        res.seconds, res.stopped = clock() - start, "max_rounds"
        return res
    ratios: list[float] = []
    a_times: list[float] = []
    b_times: list[float] = []
    stopped = "max_rounds"
    for i in range(max_rounds):
        if should_stop is not None and should_stop():
            stopped = "interrupted"
            break
        round_start = clock()
        sums = {"A": 0.0, "B": 0.0}
        for arm in _round_order(design, i, rng):
            dt = arms[arm](i)
            sums[arm] += dt
            (a_times if arm == "A" else b_times).append(dt)
        ratios.append(sums["A"] / sums["B"])
        if len(ratios) >= min_rounds:
            if relative_width(*median_ci(ratios)) <= target_rel_width:
                stopped = "target_width"
                break
        # stop when another round like this one would end past the cap: the measurement stays
        # within its wall budget instead of overrunning it by up to a round
        now = clock()
        if max_seconds is not None and i + 1 < max_rounds:
            if now - start + (now - round_start) > max_seconds:
                stopped = "max_seconds"
                break
    if not ratios:
        return Paired(
            None,
            None,
            None,
            0,
            METHOD.format(design=design),
            seconds=clock() - start,
            stopped=stopped,
        )
    res = summarize(
        ratios,
        METHOD.format(design=design),
        a_step_s=statistics.median(a_times),
        b_step_s=statistics.median(b_times),
    )
    res.seconds, res.stopped = clock() - start, stopped
    return res


# --- wording shared by the benchmarks and the analysis
# ----------------------------------------------------------


def noise_pct(low: float, high: float) -> float:
    """The half-range, in % of 1, of an interval around 1: how large an effect it cannot rule
    out."""
    return 100 * max(abs(low - 1.0), abs(high - 1.0))


def describe(ratio: Optional[float], low: Optional[float], high: Optional[float]) -> str:
    """A ratio as a time overhead a reader can trust: '+21.4% (95% CI +18.0% to +25.1%)', or 'within
    noise
    (+-6.2%)' when the interval contains 1 (no effect shown either way), or 'n/a' / 'x% (no
    interval: ...)'."""
    if ratio is None:
        return "n/a"
    if low is None or high is None:
        return f"{100 * (ratio - 1):+.1f}% (no interval: fewer than {MIN_ROUNDS_FOR_CI} rounds)"
    if low == high == ratio:
        return f"{100 * (ratio - 1):+.1f}% (by definition)"
    if low <= 1.0 <= high:
        return f"within noise (+-{noise_pct(low, high):.1f}%)"
    return f"{100 * (ratio - 1):+.1f}% (95% CI {100 * (low - 1):+.1f}% to {100 * (high - 1):+.1f}%)"
