"""Numbers derived from the sweep's rows, shared by the figures and the quiz so both quote the same
values.

Each function takes the rows of recompute_lab.analysis.aggregate and returns plain data; none of
them plots or
formats. Where the rows lack what a quantity needs, the result is empty (or None) and the caller
says which runs
to add: nothing here substitutes a guess for a missing measurement.

Layer: analysis (no torch).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Optional

import numpy as np

from recompute_lab.analysis.aggregate import group_key, korthikanti_bytes, naive_bytes, ok_rows

# Selective recomputation of one component at a time (figure 4): strategy label -> what it
# recomputes.
COMPONENTS = {
    "selective[core_attn]": "attention core (QK^T, softmax, xV)",
    "selective[attn]": "attention incl. projections (qkv, core, out)",
    "selective[mlp]": "MLP (fc, act, proj)",
    "selective[norm]": "layer norms",
}
COMPONENT_RUNS = (
    "+strategy=none",
    "+strategy=selective 'strategy.modules=[core_attn],[attn],[mlp],[norm]'",
)


def block_activation(r: dict) -> Optional[int]:
    """Saved-for-backward bytes without the fp32 logits (which Korthikanti's per-layer count leaves
    out)."""
    a = r.get("act_bytes_measured")
    if a is None:
        return None
    return a - (r.get("logits_bytes") or 0)


def context_series(rows: list[dict]) -> dict[tuple, list[dict]]:
    """`none` runs grouped by (model, precision, attention, batch, rest of the config), one point
    per seq_len.

    Every point carries the Korthikanti and naive reference bytes for the same shape, so the
    reference lines
    exist even when the measurement is missing.
    """
    series: dict[tuple, dict[int, dict]] = defaultdict(dict)
    for r in ok_rows(rows):
        if r["strategy"] != "none" or None in (
            r["seq_len"],
            r["batch_size"],
            r["d_model"],
            r["n_layer"],
        ):
            continue
        key = (r["model"], r["precision"], r["attention"], r["batch_size"], r["_series_key"])
        s, b, h, a, L = r["seq_len"], r["batch_size"], r["d_model"], r["n_head"], r["n_layer"]
        series[key].setdefault(
            s,
            {
                "seq_len": s,
                "tokens": s * b,
                "measured": block_activation(r),
                "run": r["run"],
                "korthikanti": korthikanti_bytes(s, b, h, a, L),
                "naive": naive_bytes(s, b, h, L),
                "n_layer": L,
            },
        )
    # A single sequence length is no series (e.g. the one-shape runs of other figures): left out.
    return {
        k: [v[s] for s in sorted(v)]
        for k, v in sorted(series.items(), key=lambda kv: str(kv[0]))
        if len(v) >= 2
    }


def fit_context(points: list[dict]) -> dict:
    """Least-squares fits of measured bytes against tokens: linear (slope per token) and, with >= 3
    seq_lens,
    quadratic in s (the s^2 term of stored attention scores). Keys absent when the points do not
    allow them."""
    pts = [p for p in points if p["measured"] is not None]
    out: dict = {"n_points": len(pts)}
    if len(pts) < 2:
        return out
    tokens = np.array([p["tokens"] for p in pts], dtype=float)
    y = np.array([p["measured"] for p in pts], dtype=float)
    slope, intercept = np.polyfit(tokens, y, 1)
    out.update(
        slope_per_token=float(slope),
        intercept=float(intercept),
        slope_per_token_layer=float(slope) / pts[0]["n_layer"],
    )
    if len(pts) >= 3:
        s = np.array([p["seq_len"] for p in pts], dtype=float)
        c2, c1, c0 = np.polyfit(s, y, 2)
        s_max = s.max()
        out.update(
            quad_s2=float(c2),
            quad_s=float(c1),
            quad_c=float(c0),
            s2_share_at_max=float(c2 * s_max**2 / y[np.argmax(s)]),
            s_max=int(s_max),
        )
    return out


def richest_group(rows: list[dict], want: Optional[set] = None) -> Optional[tuple]:
    """The (model, precision, attention, seq_len, batch) group with the most strategies that have a
    baseline
    (restricted to strategies in ``want`` if given); ties go to the longest sequence."""
    counts: dict[tuple, set] = defaultdict(set)
    for r in ok_rows(rows):
        if r["baseline"] is not None and (
            want is None or r["strategy"] in want or r["strategy"] == "none"
        ):
            counts[group_key(r)].add(r["strategy"])
    if not counts:
        return None
    return max(counts, key=lambda k: (len(counts[k]), k[3] or 0, str(k)))


TIME_KEYS = (
    "time_overhead",
    "time_overhead_ci_low",
    "time_overhead_ci_high",
    "time_rounds",
    "time_overhead_rep",
    "time_overhead_rep_low",
    "time_overhead_rep_high",
    "replicates",
)


def interval_contains_zero(p: dict, which: Optional[str] = None) -> bool:
    """Whether a time overhead's 95% interval contains 0 (no slowdown shown); False without an
    interval. ``which``: "rep" (between replicates, the one figures use) or "ci" (within run);
    default: between replicates where the point has them, else within run."""
    if which is None:
        which = "rep" if p.get("time_overhead_rep") is not None else "ci"
    lo, hi = p.get(f"time_overhead_{which}_low"), p.get(f"time_overhead_{which}_high")
    return lo is not None and hi is not None and lo <= 0.0 <= hi and not lo == hi == 0.0


def replicates_of(rows: list[dict], r: dict) -> list[dict]:
    """The ok runs with ``r``'s config and strategy (``r`` included): its replicates."""
    return [
        x
        for x in ok_rows(rows)
        if x.get("_key") == r.get("_key") and x["strategy"] == r["strategy"]
    ]


def tradeoffs(rows: list[dict], group: Optional[tuple] = None) -> list[dict]:
    """Per strategy in ``group`` (default: the richest): activation saving, FLOP overhead and the
    run's paired time
    overhead against `none` with its 95% interval (time_overhead_ci_low/high)."""
    group = group or richest_group(rows)
    out, seen = [], set()
    for r in ok_rows(
        rows
    ):  # a strategy run twice with the same config (two sweeps) counts once: the first
        if (
            group_key(r) == group
            and r["baseline"] is not None
            and r["strategy"] not in seen | {"none"}
        ):
            seen.add(r["strategy"])
            vs_none = (
                r.get("time_baseline") == "none"
            )  # a paired overhead against another baseline is not vs none
            out.append(
                {
                    "strategy": r["strategy"],
                    "run": r["run"],
                    "act_saved_frac": r["act_saved_frac"],
                    "act_saved_bytes": r["act_saved_bytes"],
                    "flop_overhead": r["flop_overhead"],
                    **{k: r.get(k) if vs_none else None for k in TIME_KEYS},
                    "time_contended": r.get("time_contended"),
                    "time_baseline": r.get("time_baseline"),
                    # each replicate's own paired ratio and within-run interval (figure 3's dots)
                    "within_run": [
                        (x["time_overhead"], x["time_overhead_ci_low"], x["time_overhead_ci_high"])
                        for x in replicates_of(rows, r)
                        if vs_none and x["time_overhead"] is not None
                    ],
                    "act_bytes": r["act_bytes_measured"],
                    "offload_noop": bool(r.get("_offload_noop")),
                    "peak_bytes": r["peak_bytes_measured"],
                    "note": r.get("note"),
                }
            )
    return sorted(out, key=lambda t: t["strategy"])


def pareto_frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated when lower x (overhead) and higher y (saving) are better, by
    x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -float("inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def components(rows: list[dict]) -> list[dict]:
    """Figure 4 / quiz 4: for each selective[one component] run with a baseline, bytes freed per
    recomputed
    FLOP and per second of extra step time, in the group with the most such runs."""
    group = richest_group(rows, want=set(COMPONENTS))
    out, seen = [], set()
    for r in ok_rows(rows):
        if (
            group_key(r) != group
            or r["strategy"] not in COMPONENTS
            or r["act_saved_bytes"] is None
            or r["strategy"] in seen
        ):
            continue
        seen.add(r["strategy"])
        flops = r["flops_recompute"]
        # extra seconds per step from the run's paired measurement: baseline step x overhead, with
        # its interval
        base_s = r.get("time_baseline_step_s") if r.get("time_baseline") == "none" else None
        # between replicates where the run has them (the interval a rerun respects), else in-run
        rep = r.get("time_overhead_rep") is not None
        extra = {
            k: None if base_s is None or r.get(c) is None else base_s * r[c]
            for k, c in (
                ("extra_step_s", "time_overhead_rep" if rep else "time_overhead"),
                ("extra_step_s_ci_low", "time_overhead_rep_low" if rep else "time_overhead_ci_low"),
                (
                    "extra_step_s_ci_high",
                    "time_overhead_rep_high" if rep else "time_overhead_ci_high",
                ),
            )
        }
        extra["extra_interval"] = "between replicates (95% PI)" if rep else "within run (95% CI)"
        out.append(
            {
                "strategy": r["strategy"],
                "component": COMPONENTS[r["strategy"]],
                "run": r["run"],
                "freed_bytes": r["act_saved_bytes"],
                "recompute_flops": flops,
                "bytes_per_flop": (r["act_saved_bytes"] / flops) if flops else None,
                **extra,
                **{k: r.get(k) if base_s is not None else None for k in TIME_KEYS},
                "flop_overhead": r["flop_overhead"],
            }
        )
    # Ranking: freed bytes per recomputed FLOP, highest first. Components whose recompute has no
    # counted FLOPs
    # (pointwise ops only: norms) have no ratio; they follow, by bytes freed, since they cost time,
    # not matmuls.
    return sorted(
        out,
        key=lambda c: (
            c["bytes_per_flop"] is None,
            -(c["bytes_per_flop"] or c["freed_bytes"]),
            c["strategy"],
        ),
    )


def missing_components(rows: list[dict]) -> list[str]:
    have = {r["strategy"] for r in ok_rows(rows) if r["baseline"] is not None}
    return [s for s in COMPONENTS if s not in have]


def breakdown(rows: list[dict]) -> tuple[Optional[tuple], list[dict]]:
    """Figure 2: memory by kind for each strategy x precision at one (model, attention, seq_len,
    batch)."""
    combos: dict[tuple, set] = defaultdict(set)
    for r in ok_rows(rows):
        if r.get(
            "_offload_noop"
        ):  # its saved-tensor count is not device memory: no honest bar to draw
            continue
        combos[
            (r["model"], r["attention"], r["seq_len"], r["batch_size"], r["_precision_key"])
        ].add((r["strategy"], r["precision"]))
    if not combos:
        return None, []
    # The group with the most precisions (the point of the figure), then the most bars, then the
    # longest s.
    key = max(
        combos, key=lambda k: (len({p for _, p in combos[k]}), len(combos[k]), k[2] or 0, str(k))
    )
    bars, seen = [], set()
    for r in ok_rows(rows):
        if (
            (r["model"], r["attention"], r["seq_len"], r["batch_size"], r["_precision_key"]) != key
            or r.get("_offload_noop")
            or (r["strategy"], r["precision"]) in seen
        ):
            continue
        seen.add((r["strategy"], r["precision"]))
        act = block_activation(r)
        bars.append(
            {
                "label": f"{r['strategy']}\n{r['precision']}",
                "strategy": r["strategy"],
                "precision": r["precision"],
                "run": r["run"],
                "parts": {
                    "params": r["ms_params"],
                    "grads": r["ms_grads"],
                    "master": r["ms_master"],
                    "optimizer": r["ms_optimizer"],
                    "activations": act,
                    "logits": r["logits_bytes"] if act is not None else None,
                },
            }
        )
    bars.sort(key=lambda b: (str(b["precision"]), b["strategy"] != "none", b["strategy"]))
    return key, bars


def bytes_per_param(rows: list[dict]) -> list[dict]:
    """Figure 5: measured model-state bytes per parameter, by kind, one entry per precision (first
    run each)."""
    seen: dict[str, dict] = {}
    for r in ok_rows(rows):
        if r["precision"] in seen or not r["params"] or r["bytes_per_param_measured"] is None:
            continue
        seen[r["precision"]] = {
            "precision": r["precision"],
            "run": r["run"],
            "measured": r["bytes_per_param_measured"],
            "predicted": r["bytes_per_param_predicted"],
            "kinds": {
                k: (r[f"ms_{k}"] or 0) / r["params"]
                for k in ("params", "grads", "master", "optimizer")
            },
        }
    order = ["fp32", "bf16_autocast", "bf16_master", "bf16_master+fp32_grad_accum"]
    return sorted(
        seen.values(),
        key=lambda e: (
            order.index(e["precision"]) if e["precision"] in order else 99,
            e["precision"],
        ),
    )


def memory_budget(rows: list[dict]) -> dict:
    """Quiz 3: in the richest group, the memory each strategy needs (measured peak, else model state
    + saved
    activations) and the budget window in which `full` is the only one that fits."""
    group = richest_group(rows)
    need, source = {}, None
    for r in ok_rows(rows):
        if group_key(r) != group or r["strategy"] in need:
            continue
        if r["peak_bytes_measured"] is not None:
            need[r["strategy"]], source = (
                r["peak_bytes_measured"],
                f"measured peak ({r['peak_source']})",
            )
        elif (
            r["act_bytes_measured"] is not None
            and r["model_state_bytes"] is not None
            and not r.get("_offload_noop")
        ):
            need[r["strategy"]] = r["act_bytes_measured"] + r["model_state_bytes"]
            source = source or "model state + saved activations (no measured peak in these runs)"
    out = {"group": group, "need": need, "source": source}
    if "full" in need and len(need) > 1:
        others = {k: v for k, v in need.items() if k != "full"}
        lowest_other = min(others, key=others.get)
        out.update(
            full=need["full"],
            next_strategy=lowest_other,
            next_need=others[lowest_other],
            only_full_fits=need["full"] < others[lowest_other],
        )
    return out


def context_gap(rows: list[dict]) -> str:
    """Why figure 1 / quiz Q1 has no curve: the true reason and the runs that would give one."""
    none = [r for r in ok_rows(rows) if r["strategy"] == "none"]
    hint = "to fill it: +strategy=none data.seq_len=64,128,256 (model.max_seq_len >= the largest)"
    if not none:
        return f"no successful `none` runs in this sweep\n{hint}"
    lens = sorted({r["seq_len"] for r in none if r["seq_len"] is not None})
    if len(lens) < 2:
        return (
            f"{len(none)} `none` run(s), all at one sequence length (s = "
            f"{', '.join(map(str, lens)) or '?'}):"
            f"\na curve needs two or more\n{hint}"
        )
    return (
        f"{len(none)} `none` runs at s = {', '.join(map(str, lens))}, but no config has two of "
        f"them "
        f"(they differ in other settings)\n{hint}"
    )


def strategy_series(rows: list[dict]) -> dict[tuple, list[tuple[int, int]]]:
    """Figure 7: measured saved activations (s, bytes) per (model, precision, attention, batch,
    strategy, rest of
    the config), for the series with two or more sequence lengths; the richest (model, precision,
    batch) only."""
    series: dict[tuple, dict[int, int]] = defaultdict(dict)
    for r in ok_rows(rows):
        if r["seq_len"] is None or r["act_bytes_measured"] is None or r.get("_offload_noop"):
            continue
        key = (
            r["model"],
            r["precision"],
            r["attention"],
            r["batch_size"],
            r["strategy"],
            r["_series_key"],
        )
        series[key].setdefault(r["seq_len"], r["act_bytes_measured"])
    series = {k: sorted(v.items()) for k, v in series.items() if len(v) >= 2}
    if not series:
        return {}
    count: dict[tuple, int] = defaultdict(int)
    for k in series:
        count[(k[0], k[1], k[3])] += 1
    best = max(count, key=lambda g: (count[g], str(g)))
    return {
        k: v
        for k, v in sorted(series.items(), key=lambda kv: str(kv[0]))
        if (k[0], k[1], k[3]) == best
    }


# The phases of one step in time order (recompute_lab.predict.peak's names): saved activations
# held at backward's start, recompute, the attention and MLP backward moments, end of backward,
# gradient clipping, the optimizer step.
PHASE_ORDER = (
    "backward_start",
    "recompute",
    "attention_backward",
    "mlp_backward",
    "end_of_backward",
    "clip",
    "optimizer_step",
)


def step_profiles(rows: list[dict], group: Optional[tuple] = None) -> list[dict]:
    """Memory over one step, per strategy of ``group`` (default: the richest), first replicate:
    the predicted bytes at each phase (PHASE_ORDER, the ones the run predicted) beside what the
    run measured (mem_tracker): the total after forward (= at backward's start) and the peak."""
    group = group or richest_group(rows)
    out, seen = [], set()
    for r in ok_rows(rows):
        if group_key(r) != group or r["strategy"] in seen:
            continue
        seen.add(r["strategy"])
        phases = r.get("_phases_predicted") or {}
        out.append(
            {
                "strategy": r["strategy"],
                "run": r["run"],
                "predicted": [(ph, phases[ph]) for ph in PHASE_ORDER if ph in phases],
                "predicted_peak": r["peak_bytes_predicted"],
                "predicted_phase": r.get("peak_phase_predicted"),
                "after_forward": (r.get("_after_forward") or {}).get("total"),
                "peak": r["peak_bytes_measured"],
                "peak_source": r["peak_source"],
            }
        )
    return sorted(out, key=lambda p: (p["strategy"] != "none", p["strategy"]))


def loss_curves(rows: list[dict], group: Optional[tuple] = None) -> list[dict]:
    """Loss per training step of each strategy in ``group`` (first replicate) and its largest
    absolute difference from `none`'s curve: recomputation reruns the same forward, so the curves
    must coincide (a difference is float reordering at most)."""
    group = group or richest_group(rows)
    out, seen = [], set()
    for r in ok_rows(rows):
        if group_key(r) != group or r["strategy"] in seen or not r.get("_loss_history"):
            continue
        seen.add(r["strategy"])
        out.append({"strategy": r["strategy"], "run": r["run"], "loss": r["_loss_history"]})
    base = next((c["loss"] for c in out if c["strategy"] == "none"), None)
    for c in out:
        c["max_abs_diff"] = (
            None
            if base is None or len(base) != len(c["loss"]) or None in base + c["loss"]
            else max(abs(a - b) for a, b in zip(c["loss"], base))
        )
    return sorted(out, key=lambda c: (c["strategy"] != "none", c["strategy"]))


def throughput(rows: list[dict], group: Optional[tuple] = None) -> list[dict]:
    """Tokens/s per strategy of ``group``: each replicate's median with its within-run interval,
    and the between-replicate geometric mean with its 95% prediction interval."""
    group = group or richest_group(rows)
    out, seen = [], set()
    for r in ok_rows(rows):
        if group_key(r) != group or r["strategy"] in seen or r["tokens_per_s"] is None:
            continue
        seen.add(r["strategy"])
        reps = [x for x in replicates_of(rows, r) if x["tokens_per_s"] is not None]
        out.append(
            {
                "strategy": r["strategy"],
                "run": r["run"],
                "replicates": [
                    (x["tokens_per_s"], x["tokens_per_s_ci_low"], x["tokens_per_s_ci_high"])
                    for x in reps
                ],
                "rep": r.get("tokens_per_s_rep"),
                "rep_low": r.get("tokens_per_s_rep_low"),
                "rep_high": r.get("tokens_per_s_rep_high"),
            }
        )
    return sorted(out, key=lambda t: (t["strategy"] != "none", t["strategy"]))
