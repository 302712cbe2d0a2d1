"""The paired timing estimator (recompute_lab.measure.timing) on synthetic timing streams with a
fake clock: it recovers a
known ratio, its 95% interval covers the truth in ~95% of seeded trials, interleaving cancels a
drift that a
sequential design does not, and the stopping rule and wording behave as documented."""

from __future__ import annotations

import math
import random

import pytest

from recompute_lab.measure import timing


class FakeMachine:
    """Two arms whose step times are base * ratio (A) and base (B), times lognormal noise, times a
    drift factor
    (1 + drift * t) that grows with the fake clock t, which every step advances by its own
    duration."""

    def __init__(
        self, ratio: float, sigma: float = 0.1, drift: float = 0.0, base: float = 1.0, seed: int = 0
    ):
        self.rng = random.Random(seed)
        self.ratio, self.sigma, self.drift, self.base = ratio, sigma, drift, base
        self.t = 0.0

    def clock(self) -> float:
        return self.t

    def arm(self, scale: float):
        def step(i: int) -> float:
            d = (
                self.base
                * scale
                * (1 + self.drift * self.t)
                * math.exp(self.sigma * self.rng.gauss(0, 1))
            )
            self.t += d
            return d

        return step

    def arms(self):
        return self.arm(self.ratio), self.arm(1.0)


def binom_tail(n: int, k: int) -> float:
    """P(Bin(n, 1/2) <= k), summed independently of the module under test."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n


@pytest.mark.parametrize("n", [1, 5, 6, 7, 10, 20, 50])
def test_order_statistic_rank_is_the_largest_rank_with_95_percent(n):
    k = timing.order_statistic_rank(n)
    if n < timing.MIN_ROUNDS_FOR_CI:
        assert k is None and 2 * binom_tail(n, 0) > 0.05
        return
    assert 1 - 2 * binom_tail(n, k - 1) >= 0.95  # covers
    assert k + 1 > n // 2 or 1 - 2 * binom_tail(n, k) < 0.95  # and the next rank would not
    assert timing.coverage(n) == pytest.approx(1 - 2 * binom_tail(n, k - 1))


def test_recovers_a_known_ratio():
    m = FakeMachine(ratio=1.25, sigma=0.15, seed=1)
    res = timing.run_paired(
        *m.arms(), min_rounds=200, max_rounds=200, target_rel_width=0.0, clock=m.clock
    )
    assert res.rounds == 200 and res.ratio == pytest.approx(1.25, rel=0.02)
    assert res.ci95_low < 1.25 < res.ci95_high and res.ci95_low > 1.0
    assert res.a_step_s / res.b_step_s == pytest.approx(1.25, rel=0.05)
    assert len(res.ratios) == 200 and res.stopped == "max_rounds"


def test_interval_covers_the_truth_in_about_95_percent_of_seeded_trials():
    n, trials, truth = 20, 1000, 1.3
    hits = 0
    for seed in range(trials):
        m = FakeMachine(ratio=truth, sigma=0.2, seed=seed)
        res = timing.run_paired(
            *m.arms(),
            min_rounds=n,
            max_rounds=n,
            target_rel_width=0.0,
            warmup_rounds=0,
            clock=m.clock,
        )
        hits += res.ci95_low <= truth <= res.ci95_high
    expected = timing.coverage(n)  # 0.9586 at n = 20
    assert 0.94 <= expected <= 0.97
    se = math.sqrt(expected * (1 - expected) / trials)
    assert abs(hits / trials - expected) < 3.5 * se, (hits, trials, expected)


def test_interleaving_cancels_a_linear_drift_that_a_sequential_design_does_not():
    truth = 1.2
    common = dict(target_rel_width=0.0, warmup_rounds=0)
    abba_kw = dict(min_rounds=40, max_rounds=40, design="abba", **common)  # 80 steps per arm
    seq_kw = dict(
        min_rounds=80, max_rounds=80, design="sequential", **common
    )  # 80 steps per arm, A first
    # The machine slows down by 0.2% per second of (fake) time: ~+40% over the ~210 s of either
    # measurement.
    abba, seq = (
        FakeMachine(ratio=truth, sigma=0.0, drift=0.002),
        FakeMachine(ratio=truth, sigma=0.0, drift=0.002),
    )
    r_abba = timing.run_paired(*abba.arms(), clock=abba.clock, **abba_kw)
    r_seq = timing.run_paired(*seq.arms(), clock=seq.clock, **seq_kw)
    assert abba.t == pytest.approx(seq.t, rel=1e-6) and abba.t > 200  # same work, same drift
    assert r_abba.ratio == pytest.approx(truth, rel=0.001)
    assert (
        abs(r_seq.ratio / truth - 1) > 0.1
    )  # the drift lands in the sequential ratio (here it hides the 20%)
    # With noise as well, the ABBA interval covers the truth and the sequential one does not.
    abba, seq = (FakeMachine(ratio=truth, sigma=0.05, drift=0.002, seed=4) for _ in range(2))
    r_abba = timing.run_paired(*abba.arms(), clock=abba.clock, **abba_kw)
    r_seq = timing.run_paired(*seq.arms(), clock=seq.clock, **seq_kw)
    assert r_abba.ci95_low <= truth <= r_abba.ci95_high
    assert not r_seq.ci95_low <= truth <= r_seq.ci95_high


def test_random_order_design_is_unbiased_without_drift():
    m = FakeMachine(ratio=0.8, sigma=0.1, seed=5)
    res = timing.run_paired(
        *m.arms(),
        design="random",
        min_rounds=300,
        max_rounds=300,
        target_rel_width=0.0,
        clock=m.clock,
    )
    assert res.ratio == pytest.approx(0.8, rel=0.02) and "random" in res.method


def test_stops_at_the_target_width_or_a_cap():
    quiet = FakeMachine(ratio=1.1, sigma=0.001)
    res = timing.run_paired(
        *quiet.arms(), min_rounds=6, max_rounds=50, target_rel_width=0.05, clock=quiet.clock
    )
    assert res.rounds == 6 and res.stopped == "target_width"
    assert timing.relative_width(res.ratio, res.ci95_low, res.ci95_high) <= 0.05
    noisy = FakeMachine(ratio=1.1, sigma=0.5)
    res = timing.run_paired(
        *noisy.arms(), min_rounds=6, max_rounds=12, target_rel_width=0.01, clock=noisy.clock
    )
    assert res.rounds == 12 and res.stopped == "max_rounds"
    # 4 steps of ~10 s per round (noisy): it stops before a round that would end past the cap,
    # so it never overruns the cap by more than one round's spread
    for cap in (60, 100, 250):
        slow = FakeMachine(ratio=1.1, sigma=0.5, base=10.0)
        res = timing.run_paired(
            *slow.arms(), min_rounds=6, max_rounds=50, max_seconds=cap, warmup_rounds=0,
            clock=slow.clock,
        )  # fmt: skip
        assert res.stopped == "max_seconds" and res.rounds >= 1 and res.ci95_low is None
        last = res.seconds / res.rounds  # about one round
        assert res.seconds <= cap or res.rounds == 1
        assert res.seconds + last > cap * 0.5  # it used its budget, not a fraction of it
    calls = iter([False, False, True])
    res = timing.run_paired(
        *quiet.arms(),
        min_rounds=6,
        max_rounds=50,
        should_stop=lambda: next(calls),
        clock=quiet.clock,
    )
    assert res.stopped == "interrupted" and res.rounds == 2


def test_each_round_runs_both_arms_on_the_same_index_in_abba_order():
    seen = []
    res = timing.run_paired(
        lambda i: seen.append(("A", i)) or 2.0,
        lambda i: seen.append(("B", i)) or 1.0,
        min_rounds=2,
        max_rounds=2,
        warmup_rounds=1,
    )
    assert seen == [
        ("A", -1),
        ("B", -1),
        ("A", 0),
        ("B", 0),
        ("B", 0),
        ("A", 0),
        ("B", 1),
        ("A", 1),
        ("A", 1),
        ("B", 1),
    ]
    assert res.ratios == [2.0, 2.0] and res.ci95_low is None  # two rounds: no interval yet


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="design"):
        timing.run_paired(lambda i: 1.0, lambda i: 1.0, design="zigzag")
    with pytest.raises(ValueError, match="min_rounds"):
        timing.run_paired(lambda i: 1.0, lambda i: 1.0, min_rounds=5, max_rounds=3)
    with pytest.raises(ValueError):
        timing.median_ci([])


def test_wording_never_states_noise_as_a_finding():
    assert timing.describe(1.03, 0.97, 1.08) == "within noise (+-8.0%)"
    assert timing.describe(1.214, 1.18, 1.251) == "+21.4% (95% CI +18.0% to +25.1%)"
    assert timing.describe(0.9, 0.85, 0.95) == "-10.0% (95% CI -15.0% to -5.0%)"
    assert timing.describe(1.0, 1.0, 1.0) == "+0.0% (by definition)"
    assert timing.describe(1.2, None, None).startswith("+20.0% (no interval")
    assert timing.describe(None, None, None) == "n/a"
    assert timing.summarize([1.0, 1.1, 0.9, 1.05, 0.95, 1.02], "m").covers_one
