"""The theory's activation and backward-moment predictions for Llama-3 8B / 70B / 405B under each
strategy with a closed form are, byte for byte, the ones recorded before the predictions were made
linear in depth (issue 29: every saved term was matched against every checkpoint region).

tests/data/theory_depth.json holds, per case, the totals and a sha256 of the whole prediction
(predict_activations' dict, backward_moments' list and the step's peak by phase, as sorted JSON);
it was written by the quadratic code (``python tests/unit/test_theory_depth.py --write``, at the
commit before the change). A plan depends on the model's module names only, so each plan is made
on a narrow meta model of the same depth and the prediction is made for the real model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path

import pytest

from conftest import cached_compose

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "theory_depth.json"
MODELS = ("llama3_8b", "llama3_70b", "llama3_405b")
STRATEGIES = {
    "none": [],
    "full": [],
    "selective": [],
    "selective_attn_mlp": ["strategy.modules=[attn,mlp]"],
    "layers_uniform": ["strategy.method=uniform", "strategy.num_layers=4"],
    "layers_every": ["strategy.method=every", "strategy.every=3"],
    "sqrt": [],
}


def cases() -> list[tuple[str, str, int]]:
    return [(m, s, seq) for m in MODELS for s in STRATEGIES for seq in (8192,)] + [
        ("llama3_8b", s, 2048) for s in ("none", "full", "selective")
    ]


def predictions(model: str, strategy: str, seq: int) -> dict:
    """Totals and the sha256 of the whole prediction for one case."""
    from recompute_lab.config.spec import RunSpec
    from recompute_lab.model.gpt import build_model
    from recompute_lab.predict import prediction, theory
    from recompute_lab.strategies import apply_strategy

    name = strategy.split("_")[0]
    cfg = cached_compose(
        f"model={model}",
        f"+strategy={name}",
        *STRATEGIES[strategy],
        "precision=bf16_master",
        f"data.seq_len={seq}",
        "data.batch_size=1",
    )
    spec = RunSpec.of(cfg)
    m = spec.model
    narrow = dataclasses.replace(m, d_model=64, n_head=8, n_kv_head=1, d_ff=128, vocab_size=64)
    plan = apply_strategy(build_model(narrow, "meta"), spec.strategy, spec.shape("cuda"))
    st = spec.shape("cuda")
    act = theory.predict_activations(m, st, plan)
    assert act["total"] is not None, act["reason"]  # every case has a closed form
    moments = theory.backward_moments(m, st, act["regions"])
    peak = prediction.predict(spec, plan, st).peak
    text = json.dumps([act, moments, peak], sort_keys=True)
    return {
        "activations": act["total"],
        "largest_region": act["largest_region"],
        "peak": peak["total"],
        "sha256": hashlib.sha256(text.encode()).hexdigest(),
    }


def key(model: str, strategy: str, seq: int) -> str:
    return f"{model} {strategy} s={seq}"


@pytest.mark.parametrize("model,strategy,seq", cases(), ids=[key(*c) for c in cases()])
def test_predictions_are_the_recorded_bytes(model, strategy, seq):
    recorded = json.loads(GOLDEN.read_text())[key(model, strategy, seq)]
    assert predictions(model, strategy, seq) == recorded


if __name__ == "__main__" and "--write" in sys.argv:
    GOLDEN.write_text(
        json.dumps({key(*c): predictions(*c) for c in cases()}, indent=1, sort_keys=True) + "\n"
    )
