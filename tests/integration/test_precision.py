"""Precision axis: measured model-state bytes vs theory, fp32 master weights, resume, accuracy,
every strategy.

The master-weight optimizer is checked against an independent path: torch.optim.AdamW stepping fp32
copies
of the parameters with the same fp32 gradients must land on the same master weights.
"""

from __future__ import annotations

import io

import pytest
import torch

import recompute_lab.strategies
from recompute_lab.predict import theory
from recompute_lab.config import ConfigError
from recompute_lab.model.data import Batches
from recompute_lab.run.engine import run
from recompute_lab.measure.memory import model_state_bytes
from recompute_lab.model.gpt import build_model
from recompute_lab.model.precision import make_precision

from conftest import FAST, compose_config, load_results, run_cli

# (precision overrides, theory key, bytes per parameter)
PRECISIONS = {
    "fp32": (["precision=fp32"], 16),
    "bf16_autocast": (["precision=bf16_autocast"], 16),
    "bf16_master": (["precision=bf16_master"], 16),
    "bf16_master+fp32_grad_accum": (
        ["precision=bf16_master", "precision.fp32_grad_accum=true"],
        20,
    ),
}


def setup(overrides: list[str], seed: int = 0):
    """(cfg, policy, model, optimizer, batches) for ``tiny`` on small text batches, as engine.train
    builds them."""
    cfg = compose_config(["data=text", "data.batch_size=4", "data.seq_len=32", *overrides, *FAST])
    policy = make_precision(cfg.precision)
    torch.manual_seed(seed)
    model = build_model(cfg.model, "cpu", policy.param_dtype)
    return (
        cfg,
        policy,
        model,
        policy.build_optimizer(model, cfg.optimizer),
        Batches(cfg.data, cfg.model.vocab_size),
    )


def train_steps(policy, model, opt, batches, steps, grad_accum=1, max_norm=1.0) -> list[float]:
    """The engine's inner loop (without scheduler or timers): losses of ``steps``."""
    losses = []
    for step in steps:
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for m in range(grad_accum):
            idx, targets = batches.get(step, m)
            with policy.autocast("cpu"):
                loss = model(idx, targets) / grad_accum
            loss.backward()
            total += loss.item()
        policy.clip_grad_norm(model, opt, max_norm)
        opt.step()
        losses.append(total)
    return losses


@pytest.mark.parametrize("key", list(PRECISIONS))
def test_model_state_bytes_equal_theory_per_kind(key):
    overrides, per_param = PRECISIONS[key]
    cfg, policy, model, opt, batches = setup(overrides)
    train_steps(policy, model, opt, batches, range(1), grad_accum=2)
    measured = model_state_bytes(model, opt)
    n = model.get_num_params()
    predicted = theory.model_state_bytes(n, policy.name, policy.fp32_grad_accum)
    assert theory.model_state_key(policy.name, policy.fp32_grad_accum) == key
    assert measured["per_param"] == predicted["per_param"]
    assert measured["total"] == predicted["total"] == per_param * n
    assert measured["bytes_per_param"] == predicted["bytes_per_param"] == per_param
    low = "bfloat16" if policy.name == "bf16_master" else "float32"
    assert measured["dtypes"]["params"] == [low]
    # fp32 accumulation buffers are gradients too: both dtypes are reported.
    assert measured["dtypes"]["grads"] == sorted(
        {low, "float32"} if policy.fp32_grad_accum else {low}
    )
    assert measured["dtypes"]["optimizer"] == ["float32"]
    assert measured["dtypes"]["master"] == (["float32"] if policy.name == "bf16_master" else [])


@pytest.mark.parametrize("accum", [False, True])
def test_master_weights_stay_fp32_and_round_to_params(accum):
    _, policy, model, opt, batches = setup(
        PRECISIONS["bf16_master+fp32_grad_accum" if accum else "bf16_master"][0]
    )
    train_steps(policy, model, opt, batches, range(3))
    below_bf16 = 0
    for p in model.parameters():
        master = opt.state[p]["master"]
        assert p.dtype == torch.bfloat16 and master.dtype == torch.float32
        assert opt.state[p]["exp_avg"].dtype == opt.state[p]["exp_avg_sq"].dtype == torch.float32
        assert torch.equal(
            p.detach(), master.to(torch.bfloat16)
        )  # params differ from master by rounding only
        below_bf16 += int((master != p.detach().float()).sum())
    assert below_bf16 > 0  # the master copy really holds digits the bf16 params cannot


@pytest.mark.parametrize("accum", [False, True])
def test_master_step_equals_adamw_on_fp32_copies(accum):
    """Independent path: torch.optim.AdamW on fp32 copies, fed the same fp32 gradients, clipped by
    torch."""
    cfg, policy, model, opt, batches = setup(
        ["precision=bf16_master", f"precision.fp32_grad_accum={accum}"]
    )
    ref = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]
    decay = {id(p) for p in opt.param_groups[0]["params"]}
    ref_opt = torch.optim.AdamW(
        [
            {
                "params": [r for r, p in zip(ref, model.parameters()) if id(p) in decay],
                "weight_decay": cfg.optimizer.weight_decay,
            },
            {
                "params": [r for r, p in zip(ref, model.parameters()) if id(p) not in decay],
                "weight_decay": 0.0,
            },
        ],
        lr=cfg.optimizer.lr,
        betas=tuple(cfg.optimizer.betas),
        eps=cfg.optimizer.eps,
    )
    twin = setup(["precision=bf16_master"])[
        2
    ]  # same bf16 weights, no hooks: computes the micro-batch grads
    max_norm = 0.05  # small enough that clipping is active on every step
    for step in range(2):
        twin.load_state_dict(model.state_dict())
        micro = [batches.get(step, m) for m in range(2)]
        g1, g2 = (
            torch.autograd.grad(twin(idx, targets) / 2, list(twin.parameters()))
            for idx, targets in micro
        )
        # expected step gradient: summed in fp32 (fp32_grad_accum) or accumulated in bf16 into
        # p.grad
        expected = [a.float() + b.float() if accum else (a + b).float() for a, b in zip(g1, g2)]
        opt.zero_grad(set_to_none=True)
        for idx, targets in micro:
            (model(idx, targets) / 2).backward()
        for p, e in zip(model.parameters(), expected):
            assert torch.equal(opt.state[p]["grad_fp32"] if accum else p.grad.float(), e)
            if accum:
                assert (
                    float(p.grad.abs().max()) == 0.0
                )  # the bf16 landing buffer was emptied into fp32
        for r, e in zip(ref, expected):
            r.grad = e.clone()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
        norm = policy.clip_grad_norm(model, opt, max_norm)
        torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
        assert ref_norm > max_norm
        opt.step()
        ref_opt.step()
        for p, r in zip(model.parameters(), ref):
            torch.testing.assert_close(opt.state[p]["master"], r.detach(), rtol=1e-6, atol=1e-7)


def test_zero_grad_clears_fp32_buffers_but_keeps_them():
    _, policy, model, opt, batches = setup(PRECISIONS["bf16_master+fp32_grad_accum"][0])
    train_steps(policy, model, opt, batches, range(1))
    bufs = [opt.state[p]["grad_fp32"] for p in model.parameters()]
    assert any(b.abs().sum() > 0 for b in bufs)
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    assert all(
        opt.state[p]["grad_fp32"] is b and float(b.abs().sum()) == 0.0
        for p, b in zip(model.parameters(), bufs)
    )


@pytest.mark.parametrize("key", list(PRECISIONS))
def test_state_dict_round_trip_resumes_identically(key):
    overrides = PRECISIONS[key][0]
    _, policy, model, opt, batches = setup(overrides)
    train_steps(policy, model, opt, batches, range(2), grad_accum=2)
    buf = io.BytesIO()  # a real checkpoint: serialised and read back, not just object references
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    continued = train_steps(policy, model, opt, batches, range(2, 4), grad_accum=2)

    _, policy2, model2, opt2, _ = setup(overrides, seed=123)  # fresh objects, different init
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optimizer"])
    if policy.name == "bf16_master":
        in_order = [
            p for g in opt2.param_groups for p in g["params"]
        ]  # state_dict numbers params this way
        for i, p in enumerate(in_order):
            saved = ckpt["optimizer"]["state"][i]
            assert opt2.state[p]["master"].dtype == torch.float32
            assert torch.equal(opt2.state[p]["master"], saved["master"])
            assert torch.equal(opt2.state[p]["exp_avg_sq"], saved["exp_avg_sq"])
            assert "grad_fp32" not in saved  # per-step scratch, not state
    resumed = train_steps(policy2, model2, opt2, batches, range(2, 4), grad_accum=2)
    assert resumed == continued
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_fp32_grad_accum_matches_double_batch_within_bf16_tolerance():
    """grad_accum=2 with fp32 buffers ~ one batch of twice the size (same samples), to bf16
    precision."""
    overrides = PRECISIONS["bf16_master+fp32_grad_accum"][0]
    _, policy, model, opt, batches = setup(overrides)
    _, _, big_model, big_opt, _ = setup(PRECISIONS["bf16_master"][0])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), big_model.parameters()))
    micro = [batches.get(0, m) for m in range(2)]  # two (4, 32) micro-batches
    opt.zero_grad(set_to_none=True)
    for idx, targets in micro:
        (model(idx, targets) / 2).backward()
    big_idx, big_targets = (torch.cat(t) for t in zip(*micro))  # (8, 32)
    big_model(big_idx, big_targets).backward()
    acc = torch.cat([opt.state[p]["grad_fp32"].flatten() for p in model.parameters()])
    big = torch.cat([q.grad.float().flatten() for q in big_model.parameters()])
    # Both backward passes round every activation and gradient to bf16 (8 significant bits, 2^-8
    # relative),
    # so they agree to a few bf16 ulps overall. (A dropped or doubled micro-batch would be off by
    # ~50-100%.)
    assert (acc - big).norm() <= 2**-6 * big.norm()
    for p, q in zip(model.parameters(), big_model.parameters()):
        # small per-tensor sums (norm biases: a sum over 8*32 positions with cancellation) are
        # noisier
        assert (opt.state[p]["grad_fp32"] - q.grad.float()).norm() <= 0.15 * q.grad.float().norm()
    before = [
        p.detach().float() for p in model.parameters()
    ]  # the first step creates the masters from these
    policy.clip_grad_norm(model, opt, 0.05)
    policy.clip_grad_norm(big_model, big_opt, 0.05)
    opt.step()
    big_opt.step()
    du = torch.cat(
        [(opt.state[p]["master"] - b).flatten() for p, b in zip(model.parameters(), before)]
    )
    dv = torch.cat(
        [(big_opt.state[q]["master"] - b).flatten() for q, b in zip(big_model.parameters(), before)]
    )
    # Adam's first step is ~lr * sign(g): only elements whose tiny gradient flips sign under bf16
    # noise differ
    # (seen: 1.1% relative difference, 0.02% of elements with opposite signs)
    assert (du - dv).norm() <= 0.05 * dv.norm()
    assert (torch.sign(du) != torch.sign(dv)).float().mean() < 0.01


@pytest.mark.cover()  # each value once in the fast run; the full product with -m slow
@pytest.mark.parametrize("key", list(PRECISIONS))
@pytest.mark.parametrize("strategy", sorted(recompute_lab.strategies.STRATEGIES))
def test_every_strategy_runs_under_every_precision(tmp_path, strategy, key):
    overrides, per_param = PRECISIONS[key]
    cfg = compose_config(
        [f"+strategy={strategy}", *overrides, "trainer.steps=2", "trainer.grad_accum=2", *FAST]
    )
    res = run(cfg, tmp_path)
    assert res["status"] == "ok" and len(res["loss"]["history"]) == 2
    ms = res["memory"]["model_state_bytes"]
    assert ms["measured"] == ms["predicted"] == per_param * res["model"]["params"]


@pytest.mark.slow
def test_bf16_final_loss_within_2_percent_of_fp32(tmp_path):
    final = {}
    for name in ("fp32", "bf16_autocast", "bf16_master"):
        cfg = compose_config(
            [f"precision={name}", "model=tiny", "data=text", "trainer.steps=50", *FAST]
        )
        res = run(cfg, tmp_path / name)
        assert res["status"] == "ok"
        final[name] = res["loss"]["final"]
    assert final["fp32"] < 3.5  # it learned: the byte-level loss starts near ln(256) = 5.5
    for name in ("bf16_autocast", "bf16_master"):
        assert abs(final[name] - final["fp32"]) <= 0.02 * final["fp32"], final


def test_cli_bf16_master_reports_bytes_and_dtypes_per_kind(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        ["precision=bf16_master", "trainer.steps=3", *FAST, f"hydra.run.dir={out}"], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    res = load_results(out / "results.json")
    n, ms = res["model"]["params"], res["memory"]["model_state_bytes"]
    assert res["status"] == "ok" and res["env"]["dtype"].endswith("bfloat16")
    assert ms["per_param"] == {"params": 2 * n, "grads": 2 * n, "master": 4 * n, "optimizer": 8 * n}
    assert ms["per_param"] == ms["predicted_per_param"] and ms["bytes_per_param"] == {
        "predicted": 16,
        "measured": 16,
    }
    assert ms["dtypes"] == {
        "params": ["bfloat16"],
        "grads": ["bfloat16"],
        "master": ["float32"],
        "optimizer": ["float32"],
    }


def test_unknown_precision_names_the_valid_ones():
    with pytest.raises(ConfigError, match="valid precisions: bf16_autocast, bf16_master, fp32"):
        make_precision(compose_config(["precision.name=fp16"]).precision)


def test_fp32_grad_accum_without_master_weights_is_a_clear_cli_error(tmp_path):
    proc = run_cli(
        ["precision.fp32_grad_accum=true", *FAST, f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert "needs precision=bf16_master" in proc.stderr and "Traceback" not in proc.stderr
    assert load_results(tmp_path / "r" / "results.json")["status"] == "error"
