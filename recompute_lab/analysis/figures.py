"""The ten figures of a sweep, as PNG + PDF by default (recompute_lab.analysis.figure_formats),
readable in black and white (markers, line styles and hatches carry every distinction; colour only
repeats it) with labelled units.

1 activation_vs_context   saved activation bytes vs sequence length: measured, Korthikanti, the
                          2·2·h line
2 memory_breakdown        stacked memory per strategy x precision: params, grads, master, optimizer,
                          acts, logits
3 pareto                  activation saving vs FLOP overhead (frontier drawn) and vs the paired time
                          overhead
                          (95% interval as an error bar; hollow where it contains 0)
4 components              bytes freed per recomputed FLOP (and per ms of extra step time, with its
                          interval) by
                          recomputed component
5 bytes_per_param         model-state bytes per parameter by precision, measured by kind, predicted
                          marked
6 parity                  predicted vs measured bytes (saved activations, peak) for every run, y = x
                          drawn
7 memory_vs_seq           saved activation bytes vs sequence length per strategy, one panel per
                          attention backend
8 memory_over_step        bytes held at each phase of one step, predicted, beside the measured bytes
                          after forward and the measured peak, one panel per strategy
9 loss_curves             loss per step of every strategy (they coincide: recomputation changes no
                          loss) and each one's difference from `none`
10 throughput             tokens/s per strategy: between-replicate 95% prediction interval, and each
                          replicate's within-run interval

Every figure's title names the model and the device; every strategy has one colour and one marker
(style.STRATEGY_STYLE) in every figure; every theory line says the dtype it assumes. Time intervals
in figures are between replicates (separate processes; aggregate.replicate_intervals), labelled so.

A figure whose data the sweep lacks is still written: it says why (the true reason, e.g. one
sequence length)
and which runs or results.json keys would fill it. Style (sizes, fonts, palette, byte units):
analysis.style.

Layer: analysis (no torch).
"""

from __future__ import annotations

import contextvars
from pathlib import Path

import matplotlib.pyplot as plt

from recompute_lab.analysis import FORMATS, derive, figure_formats, style
from recompute_lab.analysis.aggregate import fmt_overhead, missing_keys
from recompute_lab.analysis.style import COLORS, HATCHES, strategy_style

FIGURES = (
    "fig1_activation_vs_context",
    "fig2_memory_breakdown",
    "fig3_pareto",
    "fig4_components",
    "fig5_bytes_per_param",
    "fig6_parity",
    "fig7_memory_vs_seq",
    "fig8_memory_over_step",
    "fig9_loss_curves",
    "fig10_throughput",
)
MIB = 2**20
_WRITING = contextvars.ContextVar("figure_formats", default=FORMATS)
# fills: colour-blind-safe colours; hatches and markers carry the distinction in greyscale
GREYS = COLORS


# metadata that would make two drawings of the same data differ byte for byte (dates, versions)
_METADATA = {
    "png": {"Software": None},
    "pdf": {"CreationDate": None, "Creator": None, "Producer": None},
}


def _save(fig, out: Path, name: str) -> list[Path]:
    paths = [out / f"{name}.{fmt}" for fmt in _WRITING.get()]
    for path in paths:
        fig.savefig(path, bbox_inches="tight", metadata=_METADATA[path.suffix[1:]])
    plt.close(fig)
    return paths


def _note(ax, text: str) -> None:
    """A boxed message inside the axes: what is missing and which runs would fill it."""
    ax.text(
        0.5,
        0.5,
        text,
        transform=ax.transAxes,
        ha="center",
        va="center",
        wrap=True,
        bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.4"},
    )


def _missing_text(rows, cols, runs_hint: str) -> str:
    miss = missing_keys(rows, cols)
    lines = [f"missing {c} in {len(r)} run(s)" for c, r in miss.items()]
    return "\n".join(lines + [f"to fill it: {runs_hint}"])


def fig_activation_vs_context(rows, out: Path) -> list[Path]:
    series = derive.context_series(rows)
    fig, ax = style.figure(width=style.TWO_COLUMN * 0.75, height=3.8)
    top = max(
        [
            p[k] or 0
            for pts in series.values()
            for p in pts
            for k in ("measured", "korthikanti", "naive")
        ],
        default=1,
    )
    unit, div = style.byte_unit(top / 2)
    have_measured = False
    color, marker = strategy_style("none")
    # the references depend on shape only: one pair of lines per model shape
    refs: dict[tuple, dict] = {}
    for i, (key, pts) in enumerate(series.items()):
        model, precision, attention, batch = key[:4]
        meas = [(p["seq_len"], p["measured"] / div) for p in pts if p["measured"] is not None]
        if meas:
            have_measured = True
            ax.plot(
                *zip(*meas),
                marker=marker,
                ls=style.LINESTYLES[i % len(style.LINESTYLES)],
                color=color,
                mfc=color if i % 2 == 0 else "white",
                ms=6,
                label=f"measured ({precision} values): {model}, {attention}, b={batch}",
            )
        for p in pts:
            refs.setdefault((model, batch, p["n_layer"]), {})[p["seq_len"]] = p
    for (model, batch, _), by_s in refs.items():
        pts = [by_s[s] for s in sorted(by_s)]
        s = [p["seq_len"] for p in pts]
        ax.plot(
            s,
            [p["korthikanti"] / div for p in pts],
            ls="--",
            marker="x",
            color="0.45",
            label=f"theory, 16-bit values + 1-byte masks: Korthikanti sbh(34+5as/h)·L "
            f"({model}, b={batch})",
        )
        ax.plot(
            s,
            [p["naive"] / div for p in pts],
            ls=":",
            marker="+",
            color="0.6",
            label=f"theory, 16-bit values: 2·2·h B per token per layer ({model}, b={batch})",
        )
    ax.set_xlabel("sequence length s (tokens)")
    ax.set_ylabel(f"saved activations per step ({unit})")
    ax.set_title(
        style.wrap(
            f"Saved activations vs sequence length, no recomputation: {style.where(rows)}", 70
        )
    )
    if series:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        style.plain_log_axis(ax.xaxis)
        style.plain_log_axis(ax.yaxis)
        ax.set_xticks(sorted({p["seq_len"] for pts in series.values() for p in pts}))
        fig.legend(loc="outside lower center", ncol=1)  # below the axes: never over a curve
    if not series:
        _note(ax, derive.context_gap(rows))
    elif not have_measured:
        _note(
            ax,
            _missing_text(
                [r for r in rows if r["strategy"] == "none"],
                ("act_bytes_measured",),
                "rerun with the memory probe (memory.activation_bytes)",
            ),
        )
    return _save(fig, out, FIGURES[0])


# The measured peak's parts (mem_tracker's categories at the peak moment), in stacking order.
PEAK_PARTS = (
    ("params", ("params",)),
    ("grads", ("grads",)),
    ("optimizer", ("optimizer",)),
    ("saved activations", ("act",)),
    ("temporaries", ("temp",)),
    ("buffers, other", ("buffers", "other")),
)


def fig_memory_breakdown(rows, out: Path) -> list[Path]:
    """The measured peak of each strategy x precision, split into what was live at that moment
    (mem_tracker's categories), with the predicted peak and the phase it falls in (the theory's
    phase, recompute_lab.predict.peak). Horizontal bars: the labels read without rotation."""
    key, bars = derive.breakdown(rows)
    fig, ax = style.figure(width=style.TWO_COLUMN, height=max(2.6, 0.42 * len(bars) + 1.6))
    if not bars:
        _note(
            ax,
            "no successful runs\nto fill it: +strategy=none,full "
            "precision=fp32,bf16_autocast,bf16_master",
        )
        return _save(fig, out, FIGURES[1])
    by_run = {r["run"]: r for r in rows}
    runs = [by_run[b["run"]] for b in bars]
    y = list(range(len(bars)))
    left = [0.0] * len(bars)
    unit, div = style.byte_unit(
        max((r["peak_bytes_measured"] or r["peak_bytes_predicted"] or 1) for r in runs)
    )
    for j, (part, cats) in enumerate(PEAK_PARTS):
        vals = [sum((r.get("_peak_by_category") or {}).get(c, 0) for c in cats) / div for r in runs]
        if not any(vals):
            continue
        ax.barh(
            y,
            vals,
            left=left,
            color=GREYS[j],
            hatch=HATCHES[j],
            edgecolor="black",
            lw=0.6,
            label=part,
        )
        left = [a + v for a, v in zip(left, vals)]
    shown_pred = False
    for i, r in enumerate(runs):
        color, marker = strategy_style(r["strategy"])
        if r["peak_bytes_predicted"] is not None:
            ax.plot(
                r["peak_bytes_predicted"] / div,
                i,
                marker=marker,
                color="black",
                mfc=color,
                ms=8,
                ls="none",
                label=None if shown_pred else "predicted peak (strategy's marker)",
                zorder=5,
            )
            shown_pred = True
        end = max(left[i], (r["peak_bytes_predicted"] or 0) / div)
        phase = r.get("peak_phase_predicted") or "n/a"
        meas = (
            "n/a" if r["peak_bytes_measured"] is None else f"{r['peak_bytes_measured'] / div:.1f}"
        )
        ax.text(end * 1.02, i, f" {meas} {unit} at {phase}", va="center")
    ax.set_yticks(y, [f"{b['strategy']}, {b['precision']}" for b in bars])
    ax.invert_yaxis()
    ax.set_xlim(0, max(left) * 1.55)
    ax.set_xlabel(
        f"memory at the measured peak ({unit}); text: measured peak at the predicted phase"
    )
    model, attention, s, b = key[:4]
    ax.set_title(
        f"Peak memory and its phase: {style.where(runs)}, attention={attention}, s={s}, b={b}"
    )
    fig.legend(loc="outside lower center", ncol=4)
    if not any(r.get("_peak_by_category") for r in runs):
        ax.text(0.01, 0.98, "no mem_tracker categories in these runs", transform=ax.transAxes)
    return _save(fig, out, FIGURES[1])


def fig_pareto(rows, out: Path) -> list[Path]:
    """Left: saving vs counted FLOP overhead, Pareto frontier (exact quantities). Right: saving vs
    the time overhead: the marker at the geometric mean of the replicates, the thick bar its 95%
    prediction interval between replicates (separate processes; hollow where it contains 0), the
    small dots each replicate's own paired ratio. Without replicates the run's within-run interval
    is drawn and the axis says so. No frontier on the right: a point there is an interval."""
    pts = derive.tradeoffs(rows)
    fig, axes = style.figure(2, height=4.3, sharey=True)
    saved = [p for p in pts if p["act_saved_frac"] is not None]
    good = [p for p in saved if p["flop_overhead"] is not None]
    ax = axes[0]
    for p in good:
        c, m = strategy_style(p["strategy"])
        ax.plot(
            100 * p["flop_overhead"],
            100 * p["act_saved_frac"],
            marker=m,
            ls="none",
            color="black",
            mfc=c,
            ms=8,
            label=style.short_label(p["strategy"]),
        )
    if good:
        front = derive.pareto_frontier([(p["flop_overhead"], p["act_saved_frac"]) for p in good])
        ax.plot(
            [100 * good[i]["flop_overhead"] for i in front],
            [100 * good[i]["act_saved_frac"] for i in front],
            ls="--",
            color="0.3",
            lw=1,
            label="Pareto frontier (FLOPs, bytes)",
        )
    ax.set_xlabel("recomputed FLOPs /\n(forward + backward) (%)")
    ax = axes[1]
    timed = [p for p in saved if p["time_overhead"] is not None]
    has_rep = any(p["time_overhead_rep"] is not None for p in timed)
    for p in timed:
        c, m = strategy_style(p["strategy"])
        which = "rep" if p["time_overhead_rep"] is not None else "ci"
        centre = p["time_overhead_rep"] if which == "rep" else p["time_overhead"]
        lo, hi = p[f"time_overhead_{which}_low"], p[f"time_overhead_{which}_high"]
        y = 100 * p["act_saved_frac"]
        xerr = None if lo is None else [[100 * (centre - lo)], [100 * (hi - centre)]]
        ax.errorbar(
            100 * centre,
            y,
            xerr=xerr,
            marker=m,
            ls="none",
            color="black",
            ecolor=c,
            elinewidth=2.5,
            capsize=3,
            ms=8,
            mfc="white" if derive.interval_contains_zero(p, which) or lo is None else c,
            zorder=3,
        )
        for o, _, _ in p["within_run"] if which == "rep" else []:
            ax.plot(100 * o, y, marker="|", color="black", ms=7, ls="none", zorder=4)
    ax.axvline(0, ls=":", color="0.4", lw=1)
    ax.set_xlabel(
        "step time vs none (%); bar: 95% PI between\nreplicates (processes), |: each replicate"
        if has_rep
        else "step time vs none (%), paired in one run;\nbar: 95% CI within run"
    )
    if timed and any(derive.interval_contains_zero(p) for p in timed):
        ax.text(0.01, 0.01, "hollow: interval contains 0", transform=ax.transAxes)
    if not good:
        _note(
            axes[0],
            _missing_text(
                rows,
                ("act_bytes_measured", "flop_overhead"),
                "runs that record\nmemory.activation_bytes (memory probe)",
            )
            if pts
            else "no strategy run with a matching `none` baseline\nto fill it: "
            "+strategy=none,full,... (same config)",
        )
    if not timed:
        contended = [p["strategy"] for p in pts if p.get("time_contended")]
        _note(
            axes[1],
            ("times contended (parallel launcher): not used\n" + ", ".join(contended))
            if contended
            else "no paired time overhead vs none in these runs\n(results.json time.overhead)\n"
            "to fill it: rerun with trainer.overhead.enabled=true",
        )
    axes[0].set_ylabel("saved activations freed vs none (%)")
    group = derive.richest_group(rows)
    axes[0].set_title("vs FLOP overhead")
    n_rep = max((p["replicates"] or 0 for p in timed), default=0)
    axes[1].set_title(
        f"vs time overhead ({n_rep} replicates)" if has_rep else "vs time overhead (one run)"
    )
    skipped = [p["strategy"] for p in pts if p["act_saved_frac"] is None]
    grows = [r for r in rows if group and derive.group_key(r) == group]
    title = (
        ""
        if not group
        else f"Recomputation trade-off: {style.where(grows)}, {group[1]}, attention={group[2]}, "
        f"s={group[3]}, b={group[4]}"
    )
    if skipped and len(skipped) < len(pts):
        title += "\nnot plotted (no activation saving measured): " + ", ".join(skipped)
    fig.suptitle(title)
    if saved:  # one compact legend under both panels: the strategy's colour and marker
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(
            handles,
            labels,
            loc="outside lower center",
            ncol=6,
            handletextpad=0.2,
            columnspacing=0.8,
        )
    return _save(fig, out, FIGURES[2])


def fig_components(rows, out: Path) -> list[Path]:
    comps = derive.components(rows)
    missing = derive.missing_components(rows)
    fig, axes = style.figure(2, height=max(2.6, 0.45 * len(comps) + 1.6))
    if comps:
        names = [c["component"].replace(" (", "\n(") for c in comps]
        y = range(len(comps))
        per_flop = [(c["bytes_per_flop"] or 0.0) for c in comps]
        colors = [strategy_style(c["strategy"])[0] for c in comps]
        axes[0].barh(
            y,
            per_flop,
            color=colors,
            edgecolor="black",
            hatch=[HATCHES[i % len(HATCHES)] for i in y],
        )
        for i, c in enumerate(comps):
            if c["bytes_per_flop"] is None:
                axes[0].text(
                    0, i, " no counted FLOPs recomputed\n (pointwise ops only)", va="center"
                )
        axes[0].set_yticks(list(y), names)
        axes[0].invert_yaxis()
        # MiB per ms of extra step time, drawn only where the paired interval shows a slowdown (its
        # lower bound
        # > 0); the error bar maps the interval of the extra time onto the ratio (freed / extra_high
        # .. / extra_low).
        shown = [
            c["extra_step_s_ci_low"] is not None and c["extra_step_s_ci_low"] > 0 for c in comps
        ]
        per_ms = [
            (c["freed_bytes"] / MIB) / (1e3 * c["extra_step_s"]) if ok else 0.0
            for c, ok in zip(comps, shown)
        ]
        err = [
            [
                v - (c["freed_bytes"] / MIB) / (1e3 * c["extra_step_s_ci_high"]) if ok else 0.0
                for v, c, ok in zip(per_ms, comps, shown)
            ],
            [
                (c["freed_bytes"] / MIB) / (1e3 * c["extra_step_s_ci_low"]) - v if ok else 0.0
                for v, c, ok in zip(per_ms, comps, shown)
            ],
        ]
        axes[1].barh(
            y,
            per_ms,
            xerr=err,
            capsize=3,
            color=colors,
            edgecolor="black",
            hatch=[HATCHES[i % len(HATCHES)] for i in y],
        )
        for i, (c, ok) in enumerate(zip(comps, shown)):
            if not ok:
                axes[1].text(
                    0, i, " " + style.wrap(_time_words(c), 34).replace("\n", "\n "), va="center"
                )
        axes[1].set_yticks(list(y), [""] * len(comps))
        axes[1].invert_yaxis()
    else:
        _note(
            axes[0],
            "no selective[component] run with a matching `none` run and activation bytes\n"
            "to fill it: " + "  and  ".join(derive.COMPONENT_RUNS),
        )
    for ax in axes:  # few, tilted ticks: long numbers must not run together
        style.few_ticks(ax.xaxis, 4)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        ax.tick_params(axis="x", labelrotation=30)
    axes[0].set_xlabel("bytes freed per recomputed FLOP (B/FLOP)")
    kinds = sorted({c["extra_interval"] for c in comps if c.get("extra_step_s") is not None})
    axes[1].set_xlabel(
        "MiB freed per ms of extra step time\n(error bar: " + (", ".join(kinds) or "n/a") + ")"
    )
    title = (
        "Value of recomputing each component (selective, one module kind at a time): "
        + style.where([r for r in rows if r["strategy"] in derive.COMPONENTS])
    )
    if comps and missing:  # in the title block, where it cannot cover an axis label
        title += "\n" + style.wrap("not in this sweep: " + ", ".join(missing), 110)
    fig.suptitle(title)
    return _save(fig, out, FIGURES[3])


def _time_words(c: dict) -> str:
    """Why a component has no MiB-per-ms bar: no paired measurement, an interval that contains 0, or
    faster."""
    if c.get("time_overhead") is None:
        return "no paired time overhead vs none (results.json time.overhead)"
    return fmt_overhead(c)


def fig_bytes_per_param(rows, out: Path) -> list[Path]:
    entries = derive.bytes_per_param(rows)
    fig, ax = style.figure(width=style.TWO_COLUMN * 0.75, height=3.6)
    if not entries:
        _note(
            ax,
            "no run measured model-state bytes\nto fill it: "
            "precision=fp32,bf16_autocast,bf16_master",
        )
        return _save(fig, out, FIGURES[4])
    x = range(len(entries))
    bottom = [0.0] * len(entries)
    for j, kind in enumerate(("params", "grads", "master", "optimizer")):
        vals = [e["kinds"][kind] for e in entries]
        ax.bar(
            x,
            vals,
            bottom=bottom,
            color=GREYS[j],
            hatch=HATCHES[j],
            edgecolor="black",
            lw=0.6,
            label=f"{kind} (measured)",
        )
        bottom = [a + v for a, v in zip(bottom, vals)]
    for i, e in enumerate(entries):
        ax.text(i, e["measured"] + 0.3, f"{e['measured']:.1f}", ha="center")
    pred = [(i, e["predicted"]) for i, e in enumerate(entries) if e["predicted"] is not None]
    if pred:
        ax.plot(
            *zip(*pred),
            ls="none",
            marker="_",
            ms=30,
            mew=2,
            color="black",
            label="predicted (theory)",
        )
    ax.axhline(12, ls=":", color="0.4", lw=1, label="12 B: fp32 sum without gradients")
    ax.set_xticks(list(x), [e["precision"].replace("+", "\n+") for e in entries])
    ax.set_ylabel("model state (bytes per parameter)")
    ax.set_ylim(0, max(e["measured"] for e in entries) * 1.45)
    ax.set_title(
        style.wrap(f"Model-state bytes per parameter by precision (AdamW): {style.where(rows)}", 60)
    )
    ax.legend(loc="upper left", ncol=2, markerscale=0.4)
    return _save(fig, out, FIGURES[4])


PARITY = (("act_bytes", "saved activations", "o"), ("peak_bytes", "peak memory", "s"))


def fig_parity(rows, out: Path) -> list[Path]:
    """Predicted (recompute_lab.predict.theory) vs measured bytes for every ok run, log-log, with
    the y = x line: the
    tool's core claim as one picture. Points off the line are named in the note (largest relative
    error)."""
    fig, ax = style.figure(width=style.ONE_COLUMN * 1.3, height=3.6)
    pts = {}
    for kind, _label, _ in PARITY:
        pts[kind] = [
            (r[f"{kind}_predicted"], r[f"{kind}_measured"], r)
            for r in rows
            if r["status"] == "ok" and r.get(f"{kind}_predicted") and r.get(f"{kind}_measured")
        ]
    allv = [v for p in pts.values() for a, b, _ in p for v in (a, b)]
    if not allv:
        _note(
            ax,
            "no run has both predicted and measured bytes\nto fill it: runs with the memory probe "
            "on",
        )
        return _save(fig, out, FIGURES[5])
    unit, div = style.byte_unit(max(allv))
    for i, (kind, label, marker) in enumerate(PARITY):
        if pts[kind]:
            ax.plot(
                [a / div for a, _, _ in pts[kind]],
                [b / div for _, b, _ in pts[kind]],
                ls="none",
                marker=marker,
                mfc="none" if i else COLORS[0],
                color="black" if i else COLORS[0],
                ms=6,
                label=f"{label} ({len(pts[kind])} runs)",
            )
    lo, hi = min(allv) / div / 1.3, max(allv) / div * 1.3
    ax.plot([lo, hi], [lo, hi], ls="--", color="0.4", lw=1, label="measured = predicted")
    ax.set_xscale("log")
    ax.set_yscale("log")
    style.plain_log_axis(ax.xaxis)
    style.plain_log_axis(ax.yaxis)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(f"predicted ({unit})")
    ax.set_ylabel(f"measured ({unit})")
    worst = max(abs(b / a - 1) for p in pts.values() for a, b, _ in p)
    ax.set_title(
        style.wrap(
            f"Predicted vs measured bytes (worst {100 * worst:.1f}%): {style.where(rows)}", 40
        )
    )
    fig.legend(loc="outside lower center", ncol=1)
    return _save(fig, out, FIGURES[5])


def fig_memory_vs_seq(rows, out: Path) -> list[Path]:
    """Measured saved activations vs s, one line per strategy, one panel per attention backend."""
    series = derive.strategy_series(rows)
    attns = sorted({k[2] for k in series}, key=str)
    fig, axes = style.figure(max(1, len(attns)), height=3.4, sharey=True, squeeze=False)
    axes = list(axes[0])
    if not series:
        _note(
            axes[0],
            "no strategy has runs at two or more sequence lengths with measured activation bytes\n"
            "to fill it: +strategy=none,full,selective data.seq_len=64,128,256",
        )
        return _save(fig, out, FIGURES[6])
    unit, div = style.byte_unit(max(p[1] for pts in series.values() for p in pts))
    strategies = sorted({k[4] for k in series}, key=lambda n: (n != "none", n))
    for ax, attn in zip(axes, attns):
        for key, pts in series.items():
            if key[2] != attn:
                continue
            i = strategies.index(key[4])
            c, m = strategy_style(key[4])
            base = key[4] == "none"
            # `none` underneath, wide and hollow: a strategy that saves ~nothing (selective with
            # sdpa) lies on it and both stay visible
            ax.plot(
                [p[0] for p in pts],
                [p[1] / div for p in pts],
                marker=m,
                ls=style.LINESTYLES[i % len(style.LINESTYLES)],
                color=c,
                lw=4 if base else 1.5,
                alpha=0.45 if base else 1.0,
                mfc="none" if base else c,
                mec=c,
                ms=12 if base else 5,
                zorder=1 if base else 3,
                label=style.short_label(key[4]),
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        style.plain_log_axis(ax.xaxis)
        style.plain_log_axis(ax.yaxis)
        ax.set_xticks(sorted({p[0] for k, pts in series.items() if k[2] == attn for p in pts}))
        ax.set_xlabel("sequence length s (tokens)")
        ax.set_title(f"attention={attn}")
    axes[0].set_ylabel(f"saved activations per step ({unit})")
    model, precision, _, batch = next(iter(series))[:4]
    fig.suptitle(
        f"Saved activations vs sequence length per strategy: "
        f"{style.where([r for r in rows if r['model'] == model])}, {precision}, b={batch}"
    )
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)))
    return _save(fig, out, FIGURES[6])


PHASE_TICKS = {
    "backward_start": "bwd start\n(after fwd)",
    "recompute": "recompute",
    "attention_backward": "attn bwd",
    "mlp_backward": "mlp bwd",
    "end_of_backward": "bwd end",
    "clip": "clip",
    "optimizer_step": "optim step",
}


def fig_memory_over_step(rows, out: Path) -> list[Path]:
    """Bytes held at each phase of one step, predicted (line, the strategy's colour and marker),
    beside what the run measured with mem_tracker: the total after forward (at backward's start,
    hollow circle) and the peak (dashed line; the tracker does not say when in the step it fell)."""
    profs = [p for p in derive.step_profiles(rows) if p["predicted"]]
    n = max(1, len(profs))
    ncols = min(4, n)
    nrows = -(-n // ncols)
    style.apply()
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(style.TWO_COLUMN, 1.75 * nrows + 1.3),
        layout="constrained",
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    flat = [ax for row in axes for ax in row]
    if not profs:
        _note(
            flat[0],
            "no run predicts bytes by phase (memory.peak_bytes.predicted_parts.phases)\n"
            "to fill it: +experiment=fig3_pareto",
        )
        return _save(fig, out, FIGURES[7])
    top = max(max(v for _, v in p["predicted"]) if p["predicted"] else 0 for p in profs) or 1
    top = max([top] + [p["peak"] or 0 for p in profs])
    unit, div = style.byte_unit(top)
    order = list(derive.PHASE_ORDER)
    for ax, p in zip(flat, profs):
        c, m = strategy_style(p["strategy"])
        xs = [order.index(ph) for ph, _ in p["predicted"]]
        ax.plot(
            xs,
            [v / div for _, v in p["predicted"]],
            marker=m,
            color=c,
            mec="black",
            ms=5,
            label="predicted",
        )
        if p["after_forward"] is not None:
            ax.plot(
                0,
                p["after_forward"] / div,
                marker="o",
                mfc="none",
                mec="black",
                ms=9,
                ls="none",
                label="measured after forward",
            )
        if p["peak"] is not None:
            ax.axhline(p["peak"] / div, ls="--", color="0.3", lw=1, label="measured peak")
        ax.set_title(style.short_label(p["strategy"]), fontsize=style.MIN_FONT)
    for ax in flat[len(profs) :]:
        ax.set_visible(False)
    for ax in flat:
        ax.set_xticks(range(len(order)), [PHASE_TICKS[ph] for ph in order])
        ax.tick_params(axis="x", labelrotation=90)
        ax.set_ylim(0, top / div * 1.1)
    for row in axes:
        row[0].set_ylabel(unit)
    g = derive.richest_group(rows)
    grows = [r for r in rows if g and derive.group_key(r) == g]
    unpredicted = [p["strategy"] for p in derive.step_profiles(rows) if not p["predicted"]]
    fig.suptitle(
        f"Memory over one training step, predicted by phase vs measured: {style.where(grows)}"
        + (f", {g[1]}, attention={g[2]}, s={g[3]}, b={g[4]}" if g else "")
        + ("\nnot drawn (no prediction by phase): " + ", ".join(unpredicted) if unpredicted else "")
    )
    handles, labels = flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3)
    return _save(fig, out, FIGURES[7])


def fig_loss_curves(rows, out: Path) -> list[Path]:
    """Left: the loss of every strategy per step (markers staggered so coinciding curves all show).
    Right: each strategy's loss minus `none`'s, per step: recomputation reruns the same forward,
    so the difference is zero (or float reordering)."""
    curves = derive.loss_curves(rows)
    fig, axes = style.figure(2, height=3.6)
    if not curves:
        _note(axes[0], "no loss history in these runs (results.json loss.history)")
        return _save(fig, out, FIGURES[8])
    base = next((c["loss"] for c in curves if c["strategy"] == "none"), None)
    n = len(curves)
    for i, c in enumerate(curves):
        col, m = strategy_style(c["strategy"])
        steps = list(range(1, len(c["loss"]) + 1))
        axes[0].plot(
            steps,
            c["loss"],
            color=col,
            marker=m,
            ms=5,
            mec="black",
            mew=0.4,
            markevery=(i % max(1, len(steps)), n),
            lw=1.2,
            label=style.short_label(c["strategy"]),
        )
        if base is not None and c["max_abs_diff"] is not None:
            axes[1].plot(
                steps,
                [a - b for a, b in zip(c["loss"], base)],
                color=col,
                marker=m,
                ms=5,
                mec="black",
                mew=0.4,
                lw=1,
            )
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("training loss")
    axes[0].set_title("loss per step (all strategies)")
    axes[1].set_xlabel("training step")
    axes[1].set_ylabel("loss − none's loss")
    worst = max((c["max_abs_diff"] or 0.0) for c in curves)
    axes[1].set_title(f"difference from none (largest |Δ| = {worst:.2g})")
    if base is None:
        _note(axes[1], "no `none` run in this group to compare with")
    g = derive.richest_group(rows)
    grows = [r for r in rows if g and derive.group_key(r) == g]
    fig.suptitle(
        f"Recomputation changes no loss: {style.where(grows)}"
        + (f", {g[1]}, attention={g[2]}, s={g[3]}, b={g[4]}, same seeds" if g else "")
    )
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="outside lower center", ncol=6, handletextpad=0.2, columnspacing=0.8
    )
    return _save(fig, out, FIGURES[8])


def fig_throughput(rows, out: Path) -> list[Path]:
    """Tokens/s per strategy: the marker at the geometric mean of the replicates with its 95%
    prediction interval between replicates (thick bar); below it each replicate's median step with
    its within-run 95% interval (thin bars, small dots)."""
    pts = derive.throughput(rows)
    fig, ax = style.figure(width=style.TWO_COLUMN * 0.75, height=max(2.6, 0.4 * len(pts) + 1.8))
    if not pts:
        _note(ax, "no tokens/s in these runs (results.json time.tokens_per_s)")
        return _save(fig, out, FIGURES[9])
    for i, p in enumerate(pts):
        c, m = strategy_style(p["strategy"])
        if p["rep"] is not None:
            ax.errorbar(
                p["rep"],
                i,
                xerr=[[p["rep"] - p["rep_low"]], [p["rep_high"] - p["rep"]]],
                marker=m,
                color="black",
                mfc=c,
                ecolor=c,
                elinewidth=3,
                capsize=3,
                ms=8,
                ls="none",
                zorder=3,
                label=None if i else "between replicates: geometric mean, 95% PI",
            )
        for j, (v, lo, hi) in enumerate(p["replicates"]):
            y = i + 0.18 + 0.1 * j
            xerr = None if lo is None else [[v - lo], [hi - v]]
            ax.errorbar(
                v,
                y,
                xerr=xerr,
                marker=".",
                color="0.3",
                ecolor="0.5",
                elinewidth=0.8,
                capsize=1.5,
                ms=4,
                ls="none",
                label=None if (i or j) else "each replicate: median step, 95% CI within run",
            )
    ax.set_yticks(range(len(pts)), [style.short_label(p["strategy"]) for p in pts])
    ax.invert_yaxis()
    ax.set_xlabel("training throughput (tokens/s)")
    g = derive.richest_group(rows)
    grows = [r for r in rows if g and derive.group_key(r) == g]
    ax.set_title(
        style.wrap(
            f"Throughput per strategy: {style.where(grows)}"
            + (f", {g[1]}, attention={g[2]}, s={g[3]}, b={g[4]}" if g else ""),
            70,
        )
    )
    fig.legend(loc="outside lower center", ncol=1)
    return _save(fig, out, FIGURES[9])


def write_all(rows, out: Path, formats=None) -> list[Path]:
    """Write every figure into ``out`` in ``formats`` (figure_formats); returns the files
    written."""
    token = _WRITING.set(figure_formats(formats))  # checked before anything is written
    try:
        return _write_all(rows, out)
    finally:
        _WRITING.reset(token)


def _write_all(rows, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fn in (
        fig_activation_vs_context,
        fig_memory_breakdown,
        fig_pareto,
        fig_components,
        fig_bytes_per_param,
        fig_parity,
        fig_memory_vs_seq,
        fig_memory_over_step,
        fig_loss_curves,
        fig_throughput,
    ):
        paths += fn(rows, out)
    return paths
