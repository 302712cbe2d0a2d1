"""The training loop's progress bar costs no redraw per step (issue 29: a redraw per step was
~50 us, 0.4% of a `tiny` step, experiments/bench_cli.py): the loop hands tqdm the step's postfix
and the bar redraws on its own clock; with no bar (stderr not a terminal) the loop makes no bar
call at all."""

from __future__ import annotations

import io
import sys

import pytest

from recompute_lab.run import engine

from conftest import compose_config

STEPS = 12


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def bars(monkeypatch):
    """engine's tqdm, recording each bar's redraws and postfix calls (a redraw clock of an hour:
    any redraw besides the bar's first and its close was forced by the loop)."""
    made = []

    class Recorded(engine.tqdm):
        def __init__(self, *args, **kwargs):
            self.displays, self.postfixes = 0, []
            super().__init__(*args, **{**kwargs, "mininterval": 3600})
            made.append(self)

        def display(self, *args, **kwargs):
            self.displays += 1
            return super().display(*args, **kwargs)

        def set_postfix(self, *args, **kwargs):
            self.postfixes.append(kwargs)
            return super().set_postfix(*args, **kwargs)

    monkeypatch.setattr(engine, "tqdm", Recorded)
    return made


def train(tmp_path, progress: bool) -> dict:
    overrides = ["logger=none", "trainer.overhead.enabled=false", f"trainer.steps={STEPS}"]
    res = engine.run(compose_config([*overrides, f"trainer.progress={progress}"]), tmp_path)
    assert res["status"] == "ok", res.get("error")
    return res


def test_a_drawn_bar_is_not_redrawn_per_step(tmp_path, monkeypatch, bars):
    console = Terminal()
    monkeypatch.setattr(sys, "stderr", console)
    res = train(tmp_path, progress=True)
    (bar,) = bars
    assert bar.displays <= 2  # shown once when made and cleared at close: none per step
    assert len(bar.postfixes) == STEPS and all(p.get("refresh") is False for p in bar.postfixes)
    assert bar.postfixes[-1]["loss"] == f"{res['loss']['final']:.4f}"
    assert "tiny/none" in console.getvalue()  # it was drawn


def test_no_bar_no_bar_calls(tmp_path, monkeypatch, bars):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal (a log file): no bar
    train(tmp_path, progress=True)
    (bar,) = bars
    assert bar.disable and bar.postfixes == [] and bar.displays == 0
