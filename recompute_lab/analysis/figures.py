"""The seven figures of a sweep, as PNG + PDF, readable in black and white (markers, line styles and
hatches
carry every distinction; colour only repeats it) with labelled units.

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

A figure whose data the sweep lacks is still written: it says why (the true reason, e.g. one
sequence length)
and which runs or results.json keys would fill it. Style (sizes, fonts, palette, byte units):
analysis.style.

Layer: analysis (no torch).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from recompute_lab.analysis import derive, style
from recompute_lab.analysis.aggregate import fmt_overhead, missing_keys
from recompute_lab.analysis.style import COLORS, HATCHES, MARKERS

FIGURES = (
    "fig1_activation_vs_context",
    "fig2_memory_breakdown",
    "fig3_pareto",
    "fig4_components",
    "fig5_bytes_per_param",
    "fig6_parity",
    "fig7_memory_vs_seq",
)
MIB = 2**20
# fills: colour-blind-safe colours; hatches and markers carry the distinction in greyscale
GREYS = COLORS


def _save(fig, out: Path, name: str) -> list[Path]:
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], bbox_inches="tight", metadata={"Software": None})
    fig.savefig(
        paths[1],
        bbox_inches="tight",
        metadata={"CreationDate": None, "Creator": None, "Producer": None},
    )
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
    fig, ax = style.figure(width=style.TWO_COLUMN * 0.75, height=3.6)
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
    refs: dict[
        tuple, dict
    ] = {}  # the references depend on shape only: one pair of lines per model shape
    for i, (key, pts) in enumerate(series.items()):
        model, precision, attention, batch = key[:4]
        meas = [(p["seq_len"], p["measured"] / div) for p in pts if p["measured"] is not None]
        if meas:
            have_measured = True
            ax.plot(
                *zip(*meas),
                marker=MARKERS[i % len(MARKERS)],
                ls="-",
                color=COLORS[i % len(COLORS)],
                ms=6,
                label=f"measured: {model}, {precision}, {attention}, b={batch}",
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
            color="0.3",
            label=f"Korthikanti sbh(34+5as/h)·L, 16-bit ({model}, b={batch})",
        )
        ax.plot(
            s,
            [p["naive"] / div for p in pts],
            ls=":",
            marker="+",
            color="0.45",
            label=f"2·2·h B per token per layer ({model}, b={batch})",
        )
    ax.set_xlabel("sequence length s (tokens)")
    ax.set_ylabel(f"saved activations per step ({unit})")
    ax.set_title("Saved activations vs sequence length (no recomputation)")
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


PARTS = ("params", "grads", "master", "optimizer", "activations", "logits")


def fig_memory_breakdown(rows, out: Path) -> list[Path]:
    key, bars = derive.breakdown(rows)
    fig, ax = style.figure(
        width=min(style.TWO_COLUMN, max(style.ONE_COLUMN, 0.7 * len(bars) + 2.5)), height=3.6
    )
    if not bars:
        _note(
            ax,
            "no successful runs\nto fill it: +strategy=none,full "
            "precision=fp32,bf16_autocast,bf16_master",
        )
        return _save(fig, out, FIGURES[1])
    x = range(len(bars))
    bottom = [0.0] * len(bars)
    unit, div = style.byte_unit(max(sum(v or 0 for v in b["parts"].values()) for b in bars))
    for j, part in enumerate(PARTS):
        vals = [(b["parts"][part] or 0) / div for b in bars]
        if not any(vals):
            continue
        ax.bar(
            x,
            vals,
            bottom=bottom,
            color=GREYS[j],
            hatch=HATCHES[j],
            edgecolor="black",
            lw=0.6,
            label=part,
        )
        bottom = [a + v for a, v in zip(bottom, vals)]
    ax.set_xticks(
        list(x), [b["label"] for b in bars], rotation=90
    )  # upright labels never run together
    ax.set_ylabel(f"memory ({unit})")
    model, attention, s, b = key[:4]
    ax.set_title(f"Memory by kind: {model}, attention={attention}, s={s}, b={b}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if any(b["parts"]["activations"] is None for b in bars):
        ax.text(
            0.01,
            0.98,
            "activations/logits: n/a in runs without memory.activation_bytes",
            transform=ax.transAxes,
            va="top",
        )
    return _save(fig, out, FIGURES[1])


def fig_pareto(rows, out: Path) -> list[Path]:
    """Left: saving vs counted FLOP overhead, Pareto frontier (exact quantities). Right: saving vs
    the paired time
    overhead with its 95% interval as an error bar; hollow markers where the interval contains 0
    (within noise).
    No frontier on the right: a point there is an interval, not a value to rank by."""
    pts = derive.tradeoffs(rows)
    fig, axes = style.figure(2, height=3.4, sharey=True)
    marks = {
        p["strategy"]: (MARKERS[i % len(MARKERS)], GREYS[i % len(GREYS)]) for i, p in enumerate(pts)
    }
    saved = [p for p in pts if p["act_saved_frac"] is not None]
    good = [p for p in saved if p["flop_overhead"] is not None]
    ax = axes[0]
    for p in good:
        m, c = marks[p["strategy"]]
        ax.plot(
            100 * p["flop_overhead"],
            100 * p["act_saved_frac"],
            marker=m,
            ls="none",
            color="black",
            mfc=c,
            ms=8,
            label=p["strategy"],
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
    ax.set_xlabel("recomputed FLOPs / (forward + backward) (%)")
    ax = axes[1]
    timed = [p for p in saved if p["time_overhead"] is not None]
    for p in timed:
        m, c = marks[p["strategy"]]
        lo, hi = p["time_overhead_ci_low"], p["time_overhead_ci_high"]
        xerr = (
            None
            if lo is None
            else [[100 * (p["time_overhead"] - lo)], [100 * (hi - p["time_overhead"])]]
        )
        ax.errorbar(
            100 * p["time_overhead"],
            100 * p["act_saved_frac"],
            xerr=xerr,
            marker=m,
            ls="none",
            color="black",
            ecolor="0.35",
            capsize=3,
            ms=8,
            mfc="white" if derive.interval_contains_zero(p) or lo is None else c,
        )
    ax.axvline(0, ls=":", color="0.4", lw=1)
    ax.set_xlabel("step time vs none (%), paired in-run, 95% CI")
    if timed and any(derive.interval_contains_zero(p) for p in timed):
        ax.text(0.01, 0.01, "hollow: interval contains 0\n(within noise)", transform=ax.transAxes)
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
    axes[1].set_title("vs time overhead (95% interval)")
    skipped = [p["strategy"] for p in pts if p["act_saved_frac"] is None]
    title = (
        ""
        if not group
        else f"Recomputation trade-off: {group[0]}, {group[1]}, attention={group[2]}, "
        f"s={group[3]}, b={group[4]}"
    )
    if skipped and len(skipped) < len(pts):
        title += "\nnot plotted (no activation saving measured): " + ", ".join(skipped)
    fig.suptitle(title)
    if saved:  # one legend under both panels, markers name points
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=4)
    return _save(fig, out, FIGURES[2])


def fig_components(rows, out: Path) -> list[Path]:
    comps = derive.components(rows)
    missing = derive.missing_components(rows)
    fig, axes = style.figure(2, height=max(2.6, 0.45 * len(comps) + 1.6))
    if comps:
        names = [c["component"].replace(" (", "\n(") for c in comps]
        y = range(len(comps))
        per_flop = [(c["bytes_per_flop"] or 0.0) for c in comps]
        axes[0].barh(
            y,
            per_flop,
            color=[GREYS[i % len(GREYS)] for i in y],
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
            color=[GREYS[i % len(GREYS)] for i in y],
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
    axes[1].set_xlabel("MiB freed per ms of extra step time\n(paired, 95% CI)")
    title = "Value of recomputing each component (selective, one module kind at a time)"
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
    ax.set_title("Model-state bytes per parameter by precision (AdamW)")
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
    ax.set_title(f"Predicted vs measured bytes (worst {100 * worst:.1f}%)")
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
            ax.plot(
                [p[0] for p in pts],
                [p[1] / div for p in pts],
                marker=MARKERS[i % len(MARKERS)],
                ls=style.LINESTYLES[i % len(style.LINESTYLES)],
                color=COLORS[i % len(COLORS)],
                ms=6,
                label=key[4],
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
        f"Saved activations vs sequence length per strategy: {model}, {precision}, b={batch}"
    )
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)))
    return _save(fig, out, FIGURES[6])


def write_all(rows, out: Path) -> list[Path]:
    """Write every figure into ``out``; returns the files written."""
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
    ):
        paths += fn(rows, out)
    return paths
