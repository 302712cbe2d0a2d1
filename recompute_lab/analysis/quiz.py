"""quiz.md: the seed notebook's "Quick Quiz", answered with the numbers this sweep measured.

The seed (Ultra-Scale Playbook series, part 2) asks four questions and answers them in one line
each. Here each
answer quotes the sweep's own values (computed by recompute_lab.analysis.derive, the same values the
figures
plot) and points to the figure or the summary.csv row that shows them. Where the sweep lacks the
runs a
question needs, the answer says which runs to add. The last section corrects the seed's errors with
data.

Number formats (tests recompute and match them): bytes by aggregate.fmt_bytes, percentages with one
decimal.

Layer: analysis (no torch).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from recompute_lab.predict import theory
from recompute_lab.analysis import derive
from recompute_lab.analysis.aggregate import (
    INTERVALS_NOTE,
    fmt_bytes,
    fmt_overhead,
    fmt_rep_overhead,
    group_key,
    ok_rows,
    run_label,
)
from recompute_lab.analysis.figures import FIGURES
from recompute_lab.config import ModelConfig
from recompute_lab.config.spec import Shape


def pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def fig(i: int) -> str:
    return f"figure {i} (`{FIGURES[i - 1]}.png`)"


def q1_sequence_length(rows: list[dict]) -> list[str]:
    out = ["## 1. Why does activation memory grow with sequence length?", ""]
    series = derive.context_series(rows)
    measured = {k: v for k, v in series.items() if sum(p["measured"] is not None for p in v) >= 2}
    if not measured:
        reason = (
            derive.context_gap(rows).split("\n")[0]
            if not series
            else "the `none` runs have no saved-activation bytes measured "
            "(memory.activation_bytes.measured)"
        )
        out.append(
            f"**Not answerable from this sweep** ({reason}): it needs `none` runs at two or more "
            f"sequence "
            "lengths with saved-activation bytes measured (memory.activation_bytes.measured). Add "
            "e.g. "
            "`+strategy=none data.seq_len=64,128,256 model.max_seq_len=256 "
            "model.attention=sdpa,eager`."
        )
        return out + [""]
    out.append(
        "Every token leaves, in every layer, the tensors backward needs (norm outputs, q/k/v, the "
        "attention "
        "output, the MLP hidden): a fixed number of bytes per token, so the saved bytes grow "
        "linearly "
        "with s·b. When the attention scores are materialised (`attention=eager`), each layer also "
        "keeps "
        "b·a·s² scores and probabilities, a term quadratic in s. Fitted on this sweep's `none` "
        "runs "
        f"({fig(1)}):"
    )
    out.append("")
    saw_eager_fit = False
    for (model, precision, attention, batch, _), pts in measured.items():
        f = derive.fit_context(pts)
        runs = ", ".join(f"`{run_label(p['run'])}`" for p in pts if p["measured"] is not None)
        line = (
            f"- {model}, {precision}, attention={attention}, b={batch}: linear slope "
            f"**{f['slope_per_token']:.1f} B per token** ({f['slope_per_token_layer']:.1f} B per "
            f"token per "
            f"layer) over s = "
            f"{', '.join(str(p['seq_len']) for p in pts if p['measured'] is not None)}"
        )
        if "quad_s2" in f and attention == "eager":
            line += (
                f"; quadratic fit: s² coefficient **{f['quad_s2']:.1f} B**, the s² term is "
                f"**{pct(f['s2_share_at_max'])}** of the total at s = {f['s_max']}"
            )
            saw_eager_fit = saw_eager_fit or attention == "eager"
        elif attention == "eager":
            line += " (add a third sequence length to separate the s² term)"
        else:
            line += "; no stored scores, so no s² term"
        out.append(line + f". Rows: {runs}.")
    if not any(k[2] == "eager" for k in measured):
        out.append(
            "- No `attention=eager` series: add `model.attention=eager` to see the s² term of "
            "stored scores."
        )
    return out + [""]


def q2_tradeoff(rows: list[dict]) -> list[str]:
    out = ["## 2. What trade-off does gradient checkpointing make?", ""]
    tr = derive.tradeoffs(rows)
    if not tr:
        return out + [
            "**Not answerable from this sweep:** no run has a matching `none` run (same config, "
            "other "
            "strategy). Add `+strategy=none,full` with otherwise equal overrides.",
            "",
        ]
    g = derive.richest_group(rows)
    out.append(
        f"It frees saved activations and pays with recomputed forward work. Against `none` at "
        f"{g[0]}, "
        f"{g[1]}, attention={g[2]}, s={g[3]}, b={g[4]} ({fig(3)}; summary.csv columns "
        f"act_saved_frac, "
        "flop_overhead, time_overhead_rep with time_overhead_rep_low/high between replicates, "
        "time_overhead with time_overhead_ci_low/high within run):"
    )
    out.append("")
    for t in tr:
        if t["offload_noop"]:
            out.append(
                f"- `{t['strategy']}`: {t['note'].split('; ')[0]}; {pct(t['flop_overhead'])} more "
                f"FLOPs "
                f"(row `{run_label(t['run'])}`)."
            )
            continue
        act = (
            "activation saving n/a (memory.activation_bytes missing)"
            if t["act_saved_frac"] is None
            else f"**{pct(t['act_saved_frac'])} less activation memory** "
            f"({fmt_bytes(t['act_saved_bytes'])})"
        )
        out.append(
            f"- `{t['strategy']}`: {act} for **{pct(t['flop_overhead'])} more FLOPs**; step time "
            f"{_time(t)} (row `{run_label(t['run'])}`)."
        )
    out += [
        "",
        "Step time: " + INTERVALS_NOTE + " Each replicate's own measurement: after training, its "
        "step and `none`'s step alternate in ABBA rounds on the same batches in the same process; "
        "its ratio is the median over rounds. An interval that contains 0 shows no slowdown or "
        "speed-up at that precision. FLOPs and bytes are exact and do not vary between reruns. "
        "Recomputed pointwise ops (norms, activations) cost time but no counted FLOPs.",
        "",
    ]
    out += _loss_and_throughput(rows)
    return out


def _loss_and_throughput(rows: list[dict]) -> list[str]:
    """What recomputation does not change (the loss, figure 9) and what it costs in tokens/s
    (figure 10), from the same group of runs."""
    out = []
    curves = derive.loss_curves(rows)
    diffs = [c for c in curves if c["strategy"] != "none" and c["max_abs_diff"] is not None]
    if diffs:
        worst = max(diffs, key=lambda c: c["max_abs_diff"])
        out += [
            f"The trade-off costs no accuracy: over {len(worst['loss'])} steps with the same "
            f"seeds, the loss of every strategy differs from `none`'s by at most "
            f"**{worst['max_abs_diff']:.3g}** (`{worst['strategy']}`; {fig(9)}).",
            "",
        ]
    tp = [t for t in derive.throughput(rows) if t["rep"] is not None]
    if tp:
        cells = ", ".join(
            f"`{t['strategy']}` {t['rep']:,.0f} ({t['rep_low']:,.0f} to {t['rep_high']:,.0f})"
            for t in tp
        )
        out += [
            f"Throughput, tokens/s between replicates (geometric mean, 95% PI; {fig(10)}): "
            f"{cells}.",
            "",
        ]
    return out


def _time(t: dict) -> str:
    """A trade-off's time overhead in words, or why it has none."""
    if t.get("time_contended"):
        return f"not used (contended: {t['time_contended']})"
    if t["time_overhead"] is None:
        why = (
            f"measured against `{t['time_baseline']}`, not `none`"
            if t.get("time_baseline") not in (None, "none")
            else "no paired measurement in this run (trainer.overhead)"
        )
        return f"n/a ({why})"
    return _both(t)


def _both(t: dict) -> str:
    """Between replicates first (the interval to cite), then the within-run one(s), named."""
    within = t.get("within_run") or [
        (t["time_overhead"], t["time_overhead_ci_low"], t["time_overhead_ci_high"])
    ]
    words = "; ".join(
        fmt_overhead({"time_overhead": o, "time_overhead_ci_low": lo, "time_overhead_ci_high": hi})
        for o, lo, hi in within
    )
    if t.get("time_overhead_rep") is None:
        return f"{words} (within run; no replicates)"
    return f"{fmt_rep_overhead(t)} between replicates; within run: {words}"


def q3_full(rows: list[dict]) -> list[str]:
    out = ["## 3. In what case is full recomputation useful?", ""]
    mb = derive.memory_budget(rows)
    if "full" not in mb["need"] or len(mb["need"]) < 2:
        return out + [
            "**Not answerable from this sweep:** it needs `full` and at least one other strategy "
            "with "
            "the same config and measured memory (peak bytes or saved activations). Add "
            "`+strategy=none,full,selective` on one config.",
            "",
        ]
    g = mb["group"]
    needs = ", ".join(
        f"`{k}` {fmt_bytes(v)}" for k, v in sorted(mb["need"].items(), key=lambda kv: kv[1])
    )
    out.append(
        f"When memory, not time, is the limit. Memory each strategy needs at {g[0]}, {g[1]}, "
        f"attention={g[2]}, s={g[3]} ({mb['source']}; summary.csv column peak_bytes_measured; "
        f"{fig(8)} draws each strategy's bytes phase by phase): {needs}."
    )
    out.append("")
    if mb["only_full_fits"]:
        out.append(
            f"With a budget of at least **{fmt_bytes(mb['full'])}** and below "
            f"**{fmt_bytes(mb['next_need'])}** "
            f"(what `{mb['next_strategy']}` needs), `full` is the only strategy in this sweep that "
            f"fits; "
            f"it pays {pct(_row(rows, g, 'full', 'flop_overhead'))} more FLOPs for it ({fig(3)})."
        )
    else:
        out.append(
            f"In this sweep `full` is never the only one that fits: `{mb['next_strategy']}` needs "
            f"{fmt_bytes(mb['next_need'])}, not more than `full`'s {fmt_bytes(mb['full'])}."
        )
    out.append(
        "Below the smallest of these the run does not fit at all: shard the model state or shorten "
        "the "
        "micro-batch."
    )
    return out + [""]


def _row(rows: list[dict], group: tuple, strategy: str, col: str):
    for r in ok_rows(rows):
        if group_key(r) == group and r["strategy"] == strategy:
            return r[col]
    return None


def q4_component(rows: list[dict]) -> list[str]:
    out = ["## 4. Which component benefits most from recomputation in Transformers?", ""]
    comps = derive.components(rows)
    missing = derive.missing_components(rows)
    if not comps:
        return out + [
            "**Not answerable from this sweep:** it needs selective runs that recompute one "
            "component "
            "at a time, with a matching `none` run and measured activation bytes. Add: "
            + " and ".join(f"`{c}`" for c in derive.COMPONENT_RUNS)
            + " (the selective strategy's `modules`: core_attn | attn | mlp | norm).",
            "",
        ]
    out.append(f"Ranked by bytes freed per recomputed FLOP ({fig(4)}):")
    out.append("")
    for i, c in enumerate(comps, 1):
        per = (
            "no counted FLOPs recomputed"
            if c["bytes_per_flop"] is None
            else f"**{c['bytes_per_flop']:.4g} B/FLOP**"
        )
        time = (
            ""
            if c["time_overhead"] is None
            else f"; step time {fmt_rep_overhead(c)} between replicates"
            if c.get("time_overhead_rep") is not None
            else f"; step time {fmt_overhead(c)} (within run)"
        )
        out.append(
            f"{i}. {c['component']} (`{c['strategy']}`): frees {fmt_bytes(c['freed_bytes'])} for "
            f"{c['recompute_flops'] or 0:,} recomputed FLOPs ({pct(c['flop_overhead'])} more); "
            f"{per}{time} "
            f"(row `{run_label(c['run'])}`)."
        )
    top = next((c for c in comps if c["bytes_per_flop"] is not None), None)
    if top is not None:
        holds = top["strategy"] in ("selective[core_attn]", "selective[attn]")
        eager = (derive.richest_group(rows, want=set(derive.COMPONENTS)) or (None,) * 3)[
            2
        ] == "eager"
        out += [
            "",
            f"The seed's answer (attention) {'holds' if holds else 'does not hold'} for this "
            f"sweep: "
            f"{top['component']} frees the most memory per recomputed FLOP."
            + (
                " That is the stored-scores regime (attention=eager); with `attention=sdpa` no "
                "scores are "
                "saved and the attention core frees far less (rerun with model.attention=sdpa to "
                "compare)."
                if holds and eager
                else ""
            ),
        ]
    if missing:
        out.append("")
        out.append(
            "Not in this sweep (add to complete the ranking): "
            + ", ".join(f"`{m}`" for m in missing)
            + "."
        )
    return out + [""]


def seed_errors(rows: list[dict]) -> list[str]:
    out = ["## What the seed notebook gets wrong, with this sweep's data", ""]
    bpp = {e["precision"]: e for e in derive.bytes_per_param(rows)}
    if "fp32" in bpp:
        out.append(
            f"- **fp32 with Adam is 16 B per parameter, not 12.** Measured here: "
            f"**{bpp['fp32']['measured']:.1f} B/param** (row `{run_label(bpp['fp32']['run'])}`, "
            f"{fig(5)}). "
            "The notebook "
            "adds weights + momentum + variance and forgets the gradients (4 B)."
        )
    else:
        out.append(
            "- fp32 with Adam is 16 B per parameter, not 12 (the notebook forgets the gradients); "
            "add a "
            "`precision=fp32` run to show it measured."
        )
    for name in ("bf16_master", "bf16_master+fp32_grad_accum"):
        if name in bpp:
            out.append(
                f"- `{name}`: measured **{bpp[name]['measured']:.1f} B/param** "
                f"(row `{run_label(bpp[name]['run'])}`)."
            )
    series = derive.context_series(rows)
    eager = [(k, derive.fit_context(v)) for k, v in series.items() if k[2] == "eager"]
    eager = [(k, f) for k, f in eager if "quad_s2" in f]
    if eager:
        k, f = eager[0]
        out.append(
            f"- **Activation memory is not linear in s when the scores are stored.** With "
            f"attention=eager "
            f"({k[0]}, {k[1]}) the fitted s² term is {pct(f['s2_share_at_max'])} of the saved "
            f"bytes at "
            f"s = {f['s_max']} ({fig(1)})."
        )
    else:
        out.append(
            "- Activation memory is not linear in s when attention scores are stored (a b·a·s² "
            "term per "
            "layer); this sweep has no eager series with three or more sequence lengths to show it."
        )
    worst = None
    for k, pts in series.items():
        for p in pts:
            if p["measured"] is not None and (worst is None or p["seq_len"] > worst[1]["seq_len"]):
                worst = (k, p)
    if worst:
        k, p = worst
        out.append(
            f"- **The notebook's 2·2·h bytes per token per layer undercounts.** At s = "
            f"{p['seq_len']} "
            f"({k[0]}, {k[1]}, attention={k[2]}) the runs saved {fmt_bytes(p['measured'])}, "
            f"**{p['measured'] / p['naive']:.1f}x** its {fmt_bytes(p['naive'])} (Korthikanti's "
            f"formula: "
            f"{fmt_bytes(p['korthikanti'])}; {fig(1)})." + matched_regime(k, p)
        )
    return out + [""]


def matched_regime(key: tuple, point: dict) -> str:
    """What differs between a run and the formulas' regime (16-bit values; Korthikanti: dropout,
    1-byte masks), and
    the same model's ratios there per recompute_lab.predict.theory. Empty when the run's config is
    not at hand."""
    try:
        model = json.loads(key[4])["model"]
        cfg = ModelConfig(
            **{f.name: model[f.name] for f in dataclasses.fields(ModelConfig) if f.name in model}
        )
    except (ValueError, KeyError, TypeError, IndexError):
        return ""
    s, b, naive = point["seq_len"], point["tokens"] // point["seq_len"], point["naive"]

    def blocks(
        dropout: float, device: str
    ) -> int:  # saved bytes without the fp32 logits, as measured above
        st = Shape(b, s, "bf16_master", device=device)
        pred = theory.predict_activations(dataclasses.replace(cfg, dropout=dropout), st)
        return pred["total"] - pred["logits"]

    if key[1] == "bf16_master" and cfg.dropout > 0:
        return " This run is in the formulas' regime already (16-bit values, dropout on)."
    matched = blocks(cfg.dropout, "cpu")
    korthikanti = blocks(0.1, "cuda")
    return (
        f" The formulas assume 16-bit values (Korthikanti's also dropout); this run is {key[1]} "
        f"with dropout "
        f"{cfg.dropout:g}, so part of the gap is the dtype: at matched dtype (bf16, dropout "
        f"{cfg.dropout:g}) "
        f"the theory puts the same model at **{matched / naive:.1f}x** the line, and in "
        f"Korthikanti's regime "
        f"(bf16, dropout 0.1, CUDA's 1-byte masks) at {korthikanti / naive:.1f}x, where his "
        f"formula is within "
        f"{pct(abs(korthikanti / point['korthikanti'] - 1))} (recompute_lab.predict.theory)."
    )


def write_quiz(rows: list[dict], path: Path, source: str) -> str:
    n_ok = len(ok_rows(rows))
    failed = [r for r in rows if r["status"] != "ok"]
    head = [
        "# Quick Quiz, answered from data",
        "",
        f"Sweep `{source}`: {len(rows)} runs, {n_ok} ok"
        + (
            f", {len(failed)} not ok ({', '.join(sorted({r['status'] for r in failed}))})"
            if failed
            else ""
        )
        + ". Tables: `summary.csv` / `summary.md` (rows named by their `job` label, summary.md's "
        "first column); "
        "figures beside this file.",
        "",
    ]
    text = "\n".join(
        head
        + q1_sequence_length(rows)
        + q2_tradeoff(rows)
        + q3_full(rows)
        + q4_component(rows)
        + seed_errors(rows)
    )
    Path(path).write_text(text)
    return text
