"""The analysis on ordinary sweeps, from synthetic results.json files (no training): figure 1's true
reason when
a sweep has one sequence length, figure 4's labels and note not overlapping, summary.md's short
first column,
and the shared paper style (fonts >= 9 pt, no 'seed notebook' wording)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recompute_lab.analysis import aggregate, figures, style
from recompute_lab.cli.analyze import analyze

STRATS = {
    "none": (1000_000, 0),
    "full": (120_000, 30),
    "selective": (700_000, 3),
    "sqrt": (200_000, 35),
    "layers": (850_000, 6),
    "op": (800_000, 0),
    "regions": (900_000, 0),
    "selective[attn]": (550_000, 12),
    "selective[mlp]": (600_000, 9),
    "selective[norm]": (990_000, 0),
}


def result(
    strategy: str, precision: str = "fp32", seq_len: int = 64, overhead: float = 1.2
) -> dict:
    name, _, mods = strategy.partition("[")
    strat = {"name": name, **({"modules": [mods.rstrip("]")]} if mods else {})}
    if name == "selective" and not mods:
        strat["modules"] = ["core_attn"]
    act, rec = STRATS[strategy]
    act = act * seq_len // 64
    cfg = {
        "model": {
            "name": "tiny",
            "attention": "sdpa",
            "n_layer": 2,
            "d_model": 64,
            "n_head": 4,
            "vocab_size": 256,
        },
        "precision": {"name": precision},
        "data": {"seq_len": seq_len},
        "strategy": strat,
        "trainer": {"steps": 4},
    }
    ov = {
        "baseline": "none",
        "ratio": overhead,
        "ci95_low": overhead - 0.05,
        "ci95_high": overhead + 0.05,
        "rounds": 8,
        "baseline_step_s": 0.01,
        "method": "m",
        "skipped": None,
    }
    return {
        "schema_version": 1,
        "status": "ok",
        "config": cfg,
        "model": {"seq_len": seq_len, "batch_size": 8, "params": 100_000},
        "memory": {
            "activation_bytes": {"measured": act, "predicted": act, "logits": {"measured": 1000}},
            "peak_bytes": {"measured": 3 * act, "predicted": 3 * act, "source": "mem_tracker"},
            "model_state_bytes": {
                "measured": 1_600_000,
                "bytes_per_param": {"measured": 16.0, "predicted": 16.0},
                "per_param": {"params": 4, "grads": 4, "master": 0, "optimizer": 8},
            },
        },
        "flops": {
            "per_step": {"forward": 100, "backward": 200, "recompute": rec},
            "recompute_overhead": rec / 300,
        },
        "loss": {"final": 5.5},
        "time": {
            "step_s": [0.01] * 4,
            "warmup_steps": 1,
            "step_s_median": 0.01,
            "overhead": None if name == "none" else ov,
        },
    }


def write_sweep(folder: Path, runs: dict[str, dict]) -> Path:
    for i, (name, res) in enumerate(runs.items()):
        d = folder / f"{i}_+experiment=some_long_experiment_name,{name}"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps(res))
    return folder


@pytest.fixture
def drawn(monkeypatch):
    """Figures drawn during the test, kept open (name -> Figure) so their text can be measured."""
    kept = {}

    def save(fig, out, name):
        kept[name] = fig
        fig.savefig(out / f"{name}.png")
        return [out / f"{name}.png"]

    monkeypatch.setattr(figures, "_save", save)
    yield kept
    import matplotlib.pyplot as plt

    plt.close("all")


def texts(fig):
    from matplotlib.text import Text

    return [t for t in fig.findobj(Text) if t.get_text().strip() and t.get_visible()]


def overlaps(boxes):
    return [
        (a, b) for i, (a, ba) in enumerate(boxes) for (b, bb) in boxes[i + 1 :] if ba.overlaps(bb)
    ]


def check_figure(fig):
    """>= 9 pt text, no 'seed notebook' wording, and no two tick labels / axis labels / notes
    overlapping."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    for t in texts(fig):
        assert t.get_fontsize() >= style.MIN_FONT, (t.get_text(), t.get_fontsize())
        assert "seed notebook" not in t.get_text().lower()
    for ax in fig.axes:
        for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
            shown = [
                (t.get_text(), t.get_window_extent(r))
                for t in ticks
                if t.get_text() and t.get_visible()
            ]
            assert not overlaps(shown), overlaps(shown)
        labels = [
            (t.get_text(), t.get_window_extent(r))
            for t in (ax.xaxis.label, ax.yaxis.label)
            if t.get_text()
        ]
        other = [(t.get_text(), t.get_window_extent(r)) for t in fig.texts if t.get_text()]
        assert not overlaps(labels + other), overlaps(labels + other)
        ticks = [
            (t.get_text(), t.get_window_extent(r)) for t in ax.get_xticklabels() if t.get_text()
        ]
        assert not [
            o
            for o in overlaps(
                ticks + [(ax.xaxis.label.get_text(), ax.xaxis.label.get_window_extent(r))]
            )
            if ax.xaxis.label.get_text() in (o[0], o[1])
        ]


def test_ordinary_sweep_one_sequence_length(tmp_path, drawn):
    """-m +strategy=none,full,selective precision=fp32,bf16_autocast: figure 1 says why it has no
    curve."""
    runs = {
        f"+strategy={s},precision={p}": result(s, p)
        for s in ("none", "full", "selective")
        for p in ("fp32", "bf16_autocast")
    }
    sweep = write_sweep(tmp_path / "sw", runs)
    analyze(sweep, tmp_path / "out")
    fig1 = drawn["fig1_activation_vs_context"]
    words = " ".join(t.get_text() for t in texts(fig1))
    assert "one sequence length" in words and "s = 64" in words and "no successful" not in words
    assert "2 `none` run(s)" in words
    quiz = (tmp_path / "out" / "quiz.md").read_text()
    assert "all at one sequence length" in quiz
    for fig in drawn.values():
        check_figure(fig)
    md = (tmp_path / "out" / "summary.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")][1:]
    first = [line.split("|")[1].strip() for line in table]
    assert first == sorted(first, key=first.index) and all(len(c) <= 28 for c in first)
    assert "some_long_experiment_name" not in md.split("## Runs")[0]
    csv = (tmp_path / "out" / "summary.csv").read_text()
    assert "some_long_experiment_name" in csv  # the full folder name stays in the CSV


def test_every_strategy_and_components_are_readable(tmp_path, drawn):
    runs = {f"+strategy={s}": result(s, overhead=1.0 + 0.01 * i) for i, s in enumerate(STRATS)}
    runs.update(
        {
            f"+strategy={st},data.seq_len={s}": result(st, seq_len=s)
            for s in (128, 256)
            for st in ("none", "full")
        }
    )
    analyze(write_sweep(tmp_path / "sw", runs), tmp_path / "out")
    assert set(drawn) == set(figures.FIGURES)
    for fig in drawn.values():
        check_figure(fig)
    fig4 = drawn["fig4_components"]
    assert (
        len([t for t in fig4.axes[0].get_yticklabels() if t.get_text()]) == 4
    )  # core_attn, attn, mlp, norm rows
    assert fig4.axes[0].get_xticklabels()[0].get_rotation() == 30
    fig7 = drawn[
        "fig7_memory_vs_seq"
    ]  # memory vs s per strategy: none and full have three lengths each
    assert sorted(line.get_label() for line in fig7.axes[0].get_lines()) == ["full", "none"]


def test_one_strategy_sweep(tmp_path, drawn):
    analyze(write_sweep(tmp_path / "sw", {"+strategy=none": result("none")}), tmp_path / "out")
    for fig in drawn.values():
        check_figure(fig)


def test_byte_units():
    assert style.byte_unit(3 * 2**30) == ("GiB", 2**30)
    assert style.byte_unit(5 * 2**20) == ("MiB", 2**20)
    assert style.byte_unit(5000) == ("KiB", 1024)
    assert (
        aggregate.run_label("2_fig3_pareto/1_+experiment=fig3_pareto,+strategy=full")
        == "fig3_pareto/1"
    )
