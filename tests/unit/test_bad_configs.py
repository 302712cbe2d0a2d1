"""Bad inputs that used to end in a traceback or allocate before the guard (issue 31, findings 4,
9 and 15): Hugging Face configs with a field of the wrong type, 0 heads, nesting past the
recursion limit, a 4000-digit vocabulary or a family that does not fit; seeds and sizes beyond
int64; an output folder under a file, under /proc or unwritable; a checkpoint write cut short by a
full disk or a file-size limit. Each is a ConfigError (or OSError) naming what is wrong."""

from __future__ import annotations

import errno
import json
import sys

import pytest

from recompute_lab.config import ConfigError, validate

from conftest import FAST, ROOT, compose_config

sys.path.insert(0, str(ROOT / "experiments"))
from bad_inputs import SMALL_LLAMA as SMALL  # noqa: E402  (the table's small Llama config)


def _hf(tmp_path, text: str, *extra: str):
    from recompute_lab.config.hf import resolve_model

    path = tmp_path / "config.json"
    path.write_text(text)
    cfg = compose_config(["model=hf", f"model.hf.config={path}", *extra])
    resolve_model(cfg)
    return cfg


@pytest.mark.parametrize(
    "text, message",
    [
        (
            json.dumps({**SMALL, "hidden_size": "sixty-four"}),
            r"not a usable llama config.*hidden_size",
        ),
        (
            json.dumps({**SMALL, "num_attention_heads": 0}),
            r"not a usable llama config.*ZeroDivision",
        ),
        (
            json.dumps(SMALL)[:-1] + ', "x": ' + '{"a":' * 50000 + "1" + "}" * 50000 + "}",
            r"cannot read .*RecursionError",
        ),
        (
            json.dumps(SMALL).replace('"vocab_size": 256', '"vocab_size": ' + "9" * 4000),
            r"vocab_size=999999999999\.\.\.\(4000 digits\) is not a usable size",
        ),
    ],
    ids=["wrong type", "0 heads", "nested", "4000 digits"],
)
def test_hostile_hf_configs_are_refused_in_one_line(tmp_path, text, message):
    pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match=message):
        _hf(tmp_path, text)


def test_a_family_that_does_not_fit_the_config_is_refused(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match=r"gpt2 family's fields do not fit this llama config"):
        _hf(tmp_path, json.dumps(SMALL), "+model.hf.family=gpt2")


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.seed=99999999999999999999", r"trainer.seed=99999999999999999999 is out of range"),
        ("data.seed=-1", r"data.seed=-1 is out of range"),
        (
            "model.vocab_size=" + "9" * 30,
            r"model.vocab_size=999999999999\.\.\.\(30 digits\) is too",
        ),
    ],
)
def test_integers_beyond_int64_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config([override]))


@pytest.mark.parametrize(
    "value, message",
    [
        ("{tmp}/file/run", r"is a file, not a folder"),
        ("/proc/recompute_lab/run", r"cannot create a folder in /proc"),
    ],
)
def test_an_output_folder_that_cannot_be_made_is_refused(tmp_path, value, message):
    from recompute_lab.cli.app import check_output_dir

    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=message):
        check_output_dir([f"hydra.run.dir={value.format(tmp=tmp_path)}"])
    with pytest.raises(ConfigError, match=message.replace("run", "sweep")):
        check_output_dir(["-m", f"hydra.sweep.dir={value.format(tmp=tmp_path)}/${{now:%H}}"])
    check_output_dir([f"hydra.run.dir={tmp_path}/new/${{now:%H}}"])  # a writable one passes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the probe left nothing


def test_an_unwritable_working_folder_is_refused(tmp_path, monkeypatch):
    """As root (the test machine) chmod does not stop writes: the probe's failure is simulated."""
    import tempfile

    from recompute_lab.cli.app import check_output_dir

    def refuse(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(ConfigError, match=r"hydra.run.dir=\.: cannot create a folder in .*Perm"):
        check_output_dir([])


def test_a_checkpoint_cut_short_says_no_space_left(tmp_path, monkeypatch):
    import torch

    from recompute_lab.run import checkpoint
    from recompute_lab.run.engine import run

    real = torch.save

    def short(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("format"):
            real({"x": 1}, f)
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 960 vs 854"
            )
        return real(obj, f, *a, **k)

    monkeypatch.setattr(checkpoint.torch, "save", short)
    cfg = compose_config(
        ["trainer.steps=2", "trainer.checkpoint_every=1", "trainer.probe=false", *FAST]
    )
    with pytest.raises(OSError) as info:
        run(cfg, tmp_path)
    assert info.value.errno == errno.ENOSPC and "no space left for checkpoint" in str(info.value)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["status"] == "error" and "no space left" in res["error"]
    assert not list(tmp_path.glob(".checkpoint.pt.*.tmp"))


def test_the_synthetic_table_is_not_allocated_before_the_guard(tmp_path, monkeypatch):
    """model.vocab_size=50000000 peaked at 1.76 GB (the vocab x 4 int64 table) before the guard
    refused it and said "nothing was allocated"."""
    from recompute_lab.model import data
    from recompute_lab.run.engine import run

    made = []
    real = data.SyntheticTokens.__init__

    def spy(self, vocab_size, seed):
        made.append(vocab_size)
        real(self, vocab_size, seed)

    monkeypatch.setattr(data.SyntheticTokens, "__init__", spy)
    cfg = compose_config(["model.vocab_size=50000000", "trainer.max_memory_gb=1", *FAST])
    res = run(cfg, tmp_path)
    assert res["status"] == "oom" and "nothing was allocated" in res["error"]
    assert made == []
