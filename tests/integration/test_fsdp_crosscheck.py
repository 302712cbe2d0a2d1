"""The outside cross-check of issue 27: PyTorch's FSDPMemTracker, run over a training step of our
GPT under FSDP2 (x TP) on a fake process group in FakeTensorMode
(recompute_lab.measure.fsdp_tracker), against recompute_lab.predict's per-GPU bytes
(per_gpu.stage_bytes, layout.model_state_per_rank, peak.buffer_bytes).

Parameters, gradients, optimizer state, buffers and saved activations must equal the prediction to
the byte, or differ by a named term computed from the shapes; a residual is a miss of the
prediction (or of a term). The step's peak is compared too: exact where predict_peak's phases
hold it, an upper bound under full recomputation (the ``recompute`` phase counts every gradient),
and above the prediction where it falls inside backward (peak.UNMODELLED['fsdp']).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from recompute_lab.config import CONF_DIR, ConfigError, ModelConfig
from recompute_lab.config.spec import as_model_config
from recompute_lab.measure import fsdp_tracker as F

ROOT = Path(__file__).resolve().parents[2]
# Llama-like (RMSNorm, SwiGLU, RoPE buffers, GQA, untied head) with a 130-row vocabulary: FSDP2
# over 4 ranks splits it 33/33/33/31, and under tp = 2 its 65 local rows split 33/32 over dp 2. The
# last rank's chunks are short (padded for params and grads, not for AdamW's moments).
LLAMA_ODD = ModelConfig(
    n_layer=2,
    d_model=64,
    n_head=8,
    n_kv_head=2,
    d_ff=96,
    vocab_size=130,
    max_seq_len=32,
    norm="rmsnorm",
    mlp="swiglu",
    positions="rope",
    bias=False,
    tie_embeddings=False,
)


def model_cfg(name: str) -> ModelConfig:
    path = Path(CONF_DIR) / "model" / f"{name}.yaml"
    return as_model_config(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))


def rows_of(rep: dict) -> dict:
    return {r["category"]: r for r in rep["rows"]}


def term_names(row: dict) -> list[str]:
    return [t["name"] for t in row["terms"]]


# (dp_shard, tp, sp, precision, strategy, rank): FSDP 2 and 4, FSDP x TP 2 x 2 (with and without
# sequence parallelism), fp32 and bf16_master, none and full, first and last ranks.
GRID = [
    (2, 1, False, "fp32", "none", 0),
    (2, 1, False, "bf16_master", "full", 1),
    (4, 1, False, "fp32", "full", 3),
    (4, 1, False, "bf16_master", "none", 3),
    (2, 2, True, "bf16_master", "none", 3),
    (2, 2, False, "fp32", "full", 2),
    (2, 2, True, "bf16_master", "full", 1),
]


@pytest.mark.parametrize("dp_shard, tp, sp, precision, strategy, rank", GRID)
def test_per_gpu_bytes_match_the_tracker(dp_shard, tp, sp, precision, strategy, rank):
    rep = F.crosscheck(LLAMA_ODD, dp_shard, tp, precision, 2, None, sp, rank, strategy)
    rows = rows_of(rep)
    misses = [rows[k] for k in (*F.COMPARED, "model_state") if rows[k]["residual"] != 0]
    assert misses == [], misses
    # the tracker saw every category (a zero would make "equal" cheap)
    assert min(rows[k]["tracker"] for k in F.COMPARED) > 0
    # params and grads: no term at all; buffers (RoPE cos / sin of every block): none either
    for k in ("params", "grads", "buffers"):
        assert rows[k]["difference"] == 0 and rows[k]["terms"] == [], rows[k]
    # norm1, qkv, out, norm2, fc, proj per block; tok_emb, norm_f, head
    n_tensors = 6 * LLAMA_ODD.n_layer + 3
    counters = [t for t in rows["optimizer"]["terms"] if "step counters" in t["name"]]
    assert [t["bytes"] for t in counters] == [4 * n_tensors]
    short = [t for t in rows["optimizer"]["terms"] if "short" in t["name"]]
    dp_rank = rank // tp
    uneven = (LLAMA_ODD.vocab_size // tp) % dp_shard != 0
    assert bool(short) == (uneven and dp_rank == dp_shard - 1)  # the last dp rank's chunks
    assert all(t["bytes"] < 0 for t in short)
    inputs = [t for t in rows["activations"]["terms"] if "token ids" in t["name"]]
    assert [t["bytes"] for t in inputs] == [-16 * 2 * LLAMA_ODD.max_seq_len]
    assert rows["activations"]["tracker"] == rep["after_forward"]["activations"]
    check_peak(rep, precision, tp, strategy)


def check_peak(rep: dict, precision: str, tp: int, strategy: str) -> None:
    """The step's peak against what peak.predict_peak's phases claim: the backward start to the
    byte (bf16_master without TP), an upper bound under full recomputation (its ``recompute``
    phase counts every gradient), else above it: a moment inside backward the phases leave out
    (peak.UNMODELLED['fsdp']: a block's unsharded gradients beside the prefetched all-gather, larger
    than the backward start once gathers are fp32), or under TP the vocab-parallel loss's backward
    buffers, larger than the prediction's two fp32 (s, v / tp) tensors."""
    pred, peak = rep["predicted"], rows_of(rep)["peak"]
    if strategy == "full":
        assert pred["phase"] == "recompute" and peak["residual"] < 0, peak
    elif precision == "bf16_master" and tp == 1:
        assert pred["phase"] == "backward_start" and peak["residual"] == 0, peak
    else:
        assert pred["phase"] == "backward_start" and peak["residual"] > 0, peak


def test_tied_embeddings_under_tp_are_a_named_term():
    """tiny ties its head to the embedding; measure.tensor_parallel's plan distributes the two
    separately, so the tracker holds one more (vocab / tp, d) parameter with its gradient and
    moments: a named term, the size of that matrix's shard."""
    cfg = model_cfg("tiny")
    rep = F.crosscheck(cfg, 2, 2, "fp32", 2, 32, False, 0, "none")
    rows = rows_of(rep)
    assert all(rows[k]["residual"] == 0 for k in (*F.COMPARED, "model_state")), rep["rows"]
    head = cfg.vocab_size // 2 * cfg.d_model // 2  # tp-local rows, then the dp shard
    untied = {
        k: [t["bytes"] for t in rows[k]["terms"] if "untied head" in t["name"]]
        for k in ("params", "grads", "optimizer")
    }
    assert untied == {"params": [4 * head], "grads": [4 * head], "optimizer": [8 * head]}


def test_the_terms_can_fail():
    """A prediction off by one byte in any compared category leaves a residual: the check is not
    vacuous."""
    lay = F.layout_of(4)
    pred = F.predicted(LLAMA_ODD, lay, "none", 1, 32, "fp32")
    got = F.track_fsdp_step(LLAMA_ODD, 4, 1, "fp32", 1, 32, rank=3)
    terms = F.named_terms(LLAMA_ODD, lay, 1, 32, rank=3)
    assert all(r["residual"] == 0 for r in F.compare(pred, got, terms) if r["category"] != "peak")
    for k in F.COMPARED:
        rows = rows_of({"rows": F.compare({**pred, k: pred[k] + 1}, got, terms)})
        assert rows[k]["residual"] == -1


def test_refuses_what_it_cannot_run():
    with pytest.raises(ConfigError, match="dp_shard >= 2"):
        F.crosscheck(model_cfg("tiny"), 1)
    with pytest.raises(ConfigError, match="bf16_autocast"):
        F.fsdp_policy("bf16_autocast")


def table_predictions(text: str) -> dict:
    """The committed table's prediction cells: {(model, layout, strategy, category): GiB text}."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 6 and cells[3] in F.ROWS and re.fullmatch(r"\d+", cells[4]):
            out[tuple(cells[:4])] = cells[4]
    return out


def load_script():
    import importlib.util

    path = ROOT / "experiments" / "fsdp_crosscheck.py"
    spec = importlib.util.spec_from_file_location("fsdp_crosscheck", path)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # its dataclass looks its module up there
    spec.loader.exec_module(script)
    return script


def test_script_reduced():
    """experiments/fsdp_crosscheck.py end to end on tiny (so it cannot rot): its table parses back
    to the prediction it printed, with no residual in the compared categories."""
    script = load_script()
    case = script.Case("tiny", 2, seq=32)
    rep = script.run(case)
    text = script.table([(case, rep)], rep["seconds"])
    got = table_predictions(text)
    assert got == {("tiny", "FSDP 2", "none", k): str(rep["predicted"][k]) for k in F.ROWS}
    assert all(r["residual"] == 0 for r in rep["rows"] if r["category"] in F.COMPARED)


def test_committed_table_predictions_are_current():
    """experiments/figures/fsdp_crosscheck.md's prediction column is what the current code
    predicts (prediction side only: no tracker). On a failure, rerun the command in its header."""
    script = load_script()
    committed = table_predictions((ROOT / script.OUT).read_text())
    assert committed, "no rows parsed from the committed table"
    now = {}
    for case in script.CASES:
        pred = script.prediction_of(case)
        for category in F.ROWS:
            now[(case.model, case.label, case.strategy, category)] = str(pred[category])
    assert committed == now
