"""Memory, exactly: theory vs saved-tensor accounting vs torch_remat vs MemTracker, and the probe in
a run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from recompute_lab.predict import peak as peaks
from recompute_lab.predict import theory
from recompute_lab.config import ModelConfig
from recompute_lab.model.data import Batches
from recompute_lab.run.engine import run
from recompute_lab.strategies import Plan
from recompute_lab.measure.memory import (
    mem_tracker_step,
    model_state_bytes,
    remat_saved_bytes,
    saved_tensors,
)
from recompute_lab.model.gpt import build_model
from recompute_lab.model.precision import POLICIES, make_precision
from recompute_lab.measure.probe import memory_probe
from recompute_lab.strategies.wrap import checkpoint_module
from recompute_lab.config.spec import Shape
from recompute_lab.config.spec import RunSpec

from conftest import FAST, ROOT, compose_config, load_results, run_cli

TINY = dict(n_layer=2, d_model=64, n_head=4, d_ff=256, vocab_size=256, max_seq_len=64)
SMALL = dict(n_layer=6, d_model=512, n_head=8, d_ff=2048, vocab_size=4096, max_seq_len=1024)
LLAMA_LIKE = dict(
    TINY,
    positions="rope",
    n_kv_head=2,
    norm="rmsnorm",
    mlp="swiglu",
    bias=False,
    tie_embeddings=False,
)
# (parameter dtype, autocast): fp32, bf16 parameters, fp32 parameters under bf16 autocast
PRECISIONS = {
    "fp32": (torch.float32, False),
    "bf16": (torch.bfloat16, False),
    "bf16_autocast": (torch.float32, True),
}


def apply(model, strategy: str):
    """Apply a strategy given as "name" or "name:field=value:field=value" (the real strategies
    package)."""
    from recompute_lab.strategies import apply_strategy

    name, *options = strategy.split(":")
    opts: dict = {"name": name}
    for option in options:
        key, value = option.split("=")
        opts[key] = value if not value.startswith("[") else value.strip("[]").split(",")
    return apply_strategy(model, opts)


def measure_and_predict(
    model_kw: dict, strategy: str, precision: str, b: int, s: int, device: str = "cpu"
):
    cfg = ModelConfig(**model_kw)
    dtype, autocast = PRECISIONS[precision]
    torch.manual_seed(0)
    # Byte counts do not depend on values: skip the (slow, for `small`) weight init by materialising
    # from meta.
    model = build_model(cfg, "meta", dtype).to_empty(device=device)
    model.train()
    plan = apply(model, strategy)
    idx = torch.randint(0, cfg.vocab_size, (b, s), device=device)
    targets = torch.randint(0, cfg.vocab_size, (b, s), device=device)

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(idx, targets)

    forward.batch = (idx, targets)
    measured = saved_tensors(model, forward)
    st = Shape(
        b,
        s,
        "bf16_master" if dtype == torch.bfloat16 else ("bf16_autocast" if autocast else "fp32"),
        device="cpu",
    )
    return cfg, model, forward, plan, measured, theory.predict_activations(cfg, st, plan)


@pytest.mark.parametrize(
    "strategy",
    [
        "layers:method=uniform:num_layers=2",
        "layers:method=block:num_layers=3",
        "layers:method=every:every=2",
        "sqrt",
        "selective:modules=[attn,mlp]",
        "selective:modules=[core_attn,norm]",
    ],
)
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_every_module_level_strategy_is_predicted(strategy, attention):
    *_, measured, pred = measure_and_predict(
        dict(TINY, n_layer=4, attention=attention, dropout=0.1), strategy, "fp32", 4, 32
    )
    # Exact in total. With dropout on, a checkpoint region's input is billed differently (theory:
    # the region;
    # measurement: the module whose pack hook saw the storage first, here the loss), so by_module is
    # not compared.
    assert pred["total"] == measured["total"]


@pytest.mark.cover()  # each value once in the fast run; the full product with -m slow
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("strategy", ["none", "full", "selective"])
@pytest.mark.parametrize(
    "model_kw,b,s",
    [(TINY, 8, 64), pytest.param(SMALL, 2, 32, marks=pytest.mark.slow)],
    ids=["tiny", "small"],
)
def test_predicted_activation_bytes_match_saved_tensors(
    model_kw, b, s, strategy, precision, attention
):
    *_, measured, pred = measure_and_predict(
        dict(model_kw, attention=attention), strategy, precision, b, s
    )
    assert pred["total"] == pytest.approx(measured["total"], rel=0.02)
    # Derived term by term, the model is exact on this machine; by module too (same first-saver
    # billing).
    assert pred["by_module"] == measured["by_module"]


@pytest.mark.cover()  # each value once in the fast run; the full product with -m slow
@pytest.mark.parametrize(
    "variant",
    [
        dict(dropout=0.1),
        dict(dropout=0.1, attention="eager"),
        LLAMA_LIKE,
        dict(LLAMA_LIKE, attention="eager"),
        dict(LLAMA_LIKE, dropout=0.1),
        dict(TINY, arch="toy_mlp", max_seq_len=1),
        dict(mlp="gelu_tanh", dropout=0.1),
    ],
    ids=[
        "dropout",
        "dropout-eager",
        "llama",
        "llama-eager",
        "llama-dropout-math",
        "toy_mlp",
        "gelu_tanh",
    ],
)
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("strategy", ["none", "full", "selective"])
def test_theory_covers_dropout_rope_gqa_rmsnorm_swiglu(variant, precision, strategy):
    if variant.get("arch") == "toy_mlp" and strategy == "selective":
        pytest.skip("toy blocks have no attention core")
    *_, measured, pred = measure_and_predict(dict(TINY, **variant), strategy, precision, 4, 16)
    assert pred["total"] == measured["total"]


@pytest.mark.parametrize("strategy", ["none", "selective:modules=[norm]"])
@pytest.mark.parametrize(
    "variant,b",
    [
        (dict(positions="rope"), 1),  # v: a view of qkv, which it keeps whole
        (dict(positions="rope"), 2),  # v: a contiguous copy
        (dict(positions="rope", n_kv_head=2), 1),  # v: the GQA-repeated copy
        (dict(), 1),  # q, k, v all views of qkv: the same bytes as three copies
    ],
    ids=["rope-b1", "rope-b2", "rope-gqa-b1", "learned-b1"],
)
def test_eager_attention_value_operand_at_one_sequence(variant, b, strategy):
    """With one sequence the batched matmul folds a (1, a, s, hd) view of the qkv output into its
    operand without a copy: att @ v saves that view, and with it the whole qkv output (with RoPE,
    q and k are the rotary outputs, so only v's view holds it: +2 n h c over a copy of v)."""
    *_, measured, pred = measure_and_predict(
        dict(TINY, attention="eager", **variant), strategy, "fp32", b, 16
    )
    assert pred["total"] == measured["total"]


@pytest.mark.parametrize(
    "kw", [dict(TINY, n_layer=3), dict(LLAMA_LIKE, n_layer=3)], ids=["tiny", "llama"]
)
@pytest.mark.parametrize("precision", ["fp32", "bf16_autocast"])
def test_other_region_shapes_block_runs_and_sublayers(kw, precision):
    """Blocks 0-1 checkpointed as ONE region (through GPT.block_runner) and sub-layer regions in
    block 2."""
    from torch.utils.checkpoint import checkpoint

    from recompute_lab.model.gpt import run_sequential

    cfg, model, forward, _, _, _ = measure_and_predict(kw, "none", precision, 4, 16)

    def runner(blocks, x):  # one checkpoint region over blocks 0 and 1, block 2 plain
        x = checkpoint(run_sequential, blocks[:2], x, use_reentrant=False)
        return run_sequential(blocks[2:], x)

    model.block_runner = runner
    checkpoint_module(model.blocks[2].norm2)
    checkpoint_module(model.blocks[2].mlp.act)
    plan = Plan("mixed", "", recomputed=["blocks.0-1", "blocks.2.norm2", "blocks.2.mlp.act"])
    measured = saved_tensors(model, forward)
    st = Shape(4, 16, "bf16_autocast" if PRECISIONS[precision][1] else "fp32", device="cpu")
    assert theory.predict_activations(cfg, st, plan)["total"] == measured["total"]


def test_saved_tensor_accounting_works_on_meta_and_dedups_views():
    cfg = ModelConfig(**TINY, attention="eager")
    on = {}
    for device in ("cpu", "meta"):
        model = build_model(cfg, device)
        idx = torch.zeros(8, 64, dtype=torch.long, device=device)
        on[device] = saved_tensors(model, lambda model=model, idx=idx: model(idx, idx.clone()))
    assert on["meta"]["total"] == on["cpu"]["total"] and on["meta"]["by_op"] == on["cpu"]["by_op"]
    # q, k, v of the sdpa kernel are three views of one fused qkv output: one storage, counted once.
    model = build_model(ModelConfig(**TINY))
    idx = torch.zeros(8, 64, dtype=torch.long)
    core = [
        t
        for t in saved_tensors(model, lambda: model(idx, idx))["tensors"]
        if t["module"] == "blocks.0.attn.core"
    ]
    assert [t["nbytes"] for t in core if t["op"] == "addmm"] == [8 * 64 * 3 * 64 * 4]


@pytest.mark.parametrize("strategy", ["none", "full", "selective"])
@pytest.mark.parametrize("model_kw", [TINY, LLAMA_LIKE], ids=["tiny", "llama"])
def test_torch_remat_report_agrees_with_each_difference_named(model_kw, strategy):
    cfg, model, forward, plan, measured, _ = measure_and_predict(model_kw, strategy, "fp32", 8, 64)
    remat = remat_saved_bytes(forward)
    assert remat["available"], remat.get("reason")
    # 1. torch.utils.checkpoint keeps region inputs in its frame, off the autograd graph remat
    # walks.
    region_inputs = sum(v for k, v in measured["by_module"].items() if k in plan.recomputed)
    # 2. remat counts saved views of buffers (fp32 RoPE cos/sin tables); we exclude buffers like
    # parameters.
    hd = cfg.d_model // cfg.n_head
    buffer_views = (
        2 * cfg.max_seq_len * hd // 2 * 4 if cfg.positions == "rope" and strategy != "full" else 0
    )
    assert remat["total"] == pytest.approx(
        measured["total"] - region_inputs + buffer_views, rel=0.01
    )
    assert remat["report"][0].startswith("saved for backward:")


@pytest.mark.parametrize("strategy", ["none", "full"])
def test_mem_tracker_activations_after_forward_match_saved_tensors(strategy):
    cfg, model, forward, plan, measured, _ = measure_and_predict(TINY, strategy, "fp32", 8, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    tracked = mem_tracker_step(
        model, optimizer, forward, lambda loss: loss.backward(), inputs=forward.batch
    )
    assert tracked["available"], tracked.get("reason")
    # Named differences: the token ids (saved, op "input") are registered with MemTracker as inputs
    # ("other"),
    # and MemTracker counts the loss scalar that the forward returns (alive, not saved).
    before = sum(t["nbytes"] for t in measured["tensors"] if t["op"] == "input")
    loss_scalar = 4
    expected = measured["total"] - before + loss_scalar
    assert tracked["after_forward"]["act"] == pytest.approx(expected, rel=0.05)
    assert tracked["after_forward"]["act"] == expected  # exact here; 5% is the contract


def test_mem_tracker_import_failure_falls_back_with_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.distributed._tools.mem_tracker", None)
    out = mem_tracker_step(None, None, lambda: None, lambda loss: None)
    assert (
        out == {"available": False, "reason": out["reason"]}
        and "MemTracker unavailable" in out["reason"]
    )


def test_korthikanti_setting_per_layer_bytes_with_each_difference_named():
    """16-bit, dropout on, gelu, layernorm, eager, biases: sbh(34 + 5as/h) plus four named CPU
    terms."""
    s, b, h, a = 128, 2, 256, 8
    kw = dict(
        n_layer=2,
        d_model=h,
        n_head=a,
        d_ff=4 * h,
        vocab_size=512,
        max_seq_len=s,
        dropout=0.1,
        attention="eager",
        norm="layernorm",
        mlp="gelu",
        bias=True,
    )
    *_, measured, pred = measure_and_predict(kw, "none", "bf16", b, s)
    layer = sum(v for k, v in measured["by_module"].items() if k.startswith("blocks.1."))
    korthikanti = theory.korthikanti_layer_bytes(s, b, h, a)
    named = {
        "residual dropout masks are bf16 on CPU (Korthikanti: 1 B), two of them": 2 * s * b * h,
        "attention dropout mask is bf16 on CPU (Korthikanti: 1 B)": a * s * s * b,
        "layernorm mean and rstd, bf16 on CPU, two norms (Korthikanti: not counted)": 2
        * 2
        * 2
        * s
        * b,
        "bool causal mask ~causal[:s, :s] made per call (Korthikanti: not counted)": s * s,
    }
    assert layer == korthikanti + sum(named.values())
    assert theory.per_layer(pred, 1) == layer
    # On CUDA the masks are bool, so only the fp32 layernorm statistics and the causal mask remain.
    cuda = theory.predict_activations(ModelConfig(**kw), Shape(b, s, "bf16_master", device="cuda"))
    assert theory.per_layer(cuda, 1) == korthikanti + 2 * 2 * 4 * s * b + s * s


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_model_state_bytes_per_param_equal_theory(name, cfg_of):
    cfg = cfg_of([f"precision={name}"])
    policy = make_precision(cfg.precision)
    model = build_model(cfg.model, "cpu", policy.param_dtype)
    optimizer = policy.build_optimizer(model, cfg.optimizer)
    model(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long)).backward()
    optimizer.step()
    n = model.get_num_params()
    measured = model_state_bytes(model, optimizer)
    predicted = theory.model_state_bytes(n, policy.name, getattr(policy, "fp32_grad_accum", False))
    assert measured["per_param"] == predicted["per_param"]
    assert (
        measured["bytes_per_param"]
        == predicted["bytes_per_param"]
        == {"fp32": 16, "bf16_autocast": 16, "bf16_master": 16}.get(name, 20)
    )


def test_unpredictable_plans_return_none_with_a_reason():
    cfg, st = ModelConfig(**TINY), Shape(2, 16)
    for name in ("op", "regions", "offload"):
        plan = apply(build_model(cfg, "meta").train(), name)
        out = theory.predict_activations(cfg, st, plan)
        assert out["total"] is None and name in out["reason"]
    out = theory.predict_activations(cfg, st, Plan("x", "", recomputed=["blocks.0.mlp.fc"]))
    assert out["total"] is None and "blocks.0.mlp.fc" in out["reason"]
    assert peaks.predict_peak(cfg, st, theory.model_state_bytes(10, "fp32"), out) is None


@pytest.mark.parametrize(
    "overrides",
    [
        ["+strategy=none"],
        ["+strategy=full"],
        ["model=small", "data.seq_len=64", "data.batch_size=2"],
        ["precision=bf16_autocast", "model.attention=eager"],
    ],
)
def test_probe_peak_prediction_brackets_mem_tracker(overrides):
    cfg = compose_config([*overrides, *FAST])
    policy = make_precision(cfg.precision)
    out, _ = memory_probe(
        RunSpec.of(cfg),
        torch.device("cpu"),
        policy,
        Batches(cfg.data, cfg.model.vocab_size).get(0, 0),
    )
    peak, act = out["peak_bytes"], out["activation_bytes"]
    assert act["predicted"] == pytest.approx(act["measured"], rel=0.02)
    assert peak["source"] == "mem_tracker" and peak["by_category"]["act"] >= 0
    # Phases (recompute_lab.predict.peak): exact, but the recompute phase of checkpointed plans, an
    # upper bound.
    if peak["predicted_parts"]["phase"] == "recompute":
        assert peak["measured"] <= peak["predicted"] <= 1.25 * peak["measured"]
    else:
        assert peak["predicted"] == peak["measured"]
    if peak["predicted_parts"]["phase"] == "backward_start":
        # At that peak MemTracker's activations are still the after-forward set (saved tensors + the
        # loss) and
        # its temporaries are exactly the two fp32 (b, s, v) gradients of the head's backward, named
        # here.
        tracker = peak["mem_tracker"]
        assert peak["by_category"]["act"] == tracker["after_forward"]["act"]
        sbv = cfg.data.batch_size * cfg.data.seq_len * cfg.model.vocab_size
        assert peak["by_category"]["temp"] == 2 * 4 * sbv
        assert peak["predicted_parts"]["phases"]["backward_start"] == peak["measured"]


def test_probe_does_not_perturb_training(tmp_path):
    base = ["trainer.steps=4", "model.dropout=0.1", *FAST]
    with_probe = run(compose_config(base), tmp_path / "a")
    without = run(compose_config([*base, "trainer.probe=false"]), tmp_path / "b")
    assert with_probe["loss"]["history"] == without["loss"]["history"]
    assert without["memory"]["activation_bytes"]["measured"] is None


def test_a_failing_probe_is_recorded_and_training_goes_on(tmp_path, monkeypatch):
    import recompute_lab.measure.probe as probe

    def broken(*args):
        raise RuntimeError("instrumentation broke")

    monkeypatch.setattr(probe, "saved_tensors", broken)
    with pytest.warns(UserWarning, match="memory probe failed"):
        res = run(compose_config(["trainer.steps=2", *FAST]), tmp_path)
    assert (
        res["status"] == "ok"
        and res["memory"]["probe_error"] == "RuntimeError: instrumentation broke"
    )


def test_cli_run_writes_memory_keys(tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        ["+strategy=full", "trainer.steps=2", *FAST, f"hydra.run.dir={out}"], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    mem = load_results(out / "results.json")["memory"]
    act, peak = mem["activation_bytes"], mem["peak_bytes"]
    assert act["predicted"] == act["measured"] > 0 and act["measured"] == sum(
        act["by_module"].values()
    )
    assert set(act["by_module"]) >= {"blocks.0", "blocks.1", "head", "loss"} and act["by_op"]
    assert act["remat_report"]["total"] == act["measured"] - act["checkpoint_inputs"]
    assert peak["source"] == "mem_tracker" and peak["predicted"] > 0 and peak["measured"] > 0
    assert set(peak["by_category"]) >= {"params", "grads", "act", "temp", "optimizer"}
    assert mem["model_state_bytes"]["measured"] == mem["model_state_bytes"]["predicted"]


def test_memory_snapshot_without_probe_is_a_config_error(tmp_path):
    proc = run_cli(
        [
            "trainer.probe=false",
            "trainer.memory_snapshot=true",
            *FAST,
            f"hydra.run.dir={tmp_path / 'r'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "needs trainer.probe=true" in proc.stderr


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the memory snapshot records the CUDA allocator"
)
def test_cuda_probe_writes_memory_snapshot_and_allocator_peak(tmp_path):
    res = run(
        compose_config(
            ["trainer.steps=2", "trainer.memory_snapshot=true", "trainer.device=cuda", *FAST]
        ),
        tmp_path,
    )
    snap = tmp_path / "memory_snapshot.pickle"
    assert snap.exists() and snap.stat().st_size > 0
    peak = res["memory"]["peak_bytes"]
    assert peak["source"] == "cuda_allocator" and peak["cuda"]["allocated"] > 0


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_resident_count_sees_what_hooks_cannot(attention):
    """Two independent counts: saved_tensors_hooks vs every forward-made storage still alive
    afterwards.

    They agree to the byte wherever the hooks see every save; op SAC keeps matmul outputs in a cache
    the hooks
    never see, so only the resident count shows op between full and none.
    """
    kw = dict(TINY, n_layer=4, attention=attention, dropout=0.0)
    res = {}
    for strategy in [
        "none",
        "full",
        "selective",
        "layers:method=uniform:num_layers=2",
        "regions",
        "op",
    ]:
        *_, measured, pred = measure_and_predict(kw, strategy, "fp32", 4, 32)
        res[strategy] = measured
        if strategy != "op":
            assert measured["resident_total"] == measured["total"], strategy
    assert res["op"]["total"] == res["full"]["total"]  # the hooks see only block inputs
    assert (
        res["full"]["resident_total"] < res["op"]["resident_total"] < res["none"]["resident_total"]
    )
    if (
        attention == "sdpa"
    ):  # one SDPA op: both default plans keep the same outputs (eager: op keeps the bmm
        assert (
            res["op"]["resident_total"] == res["regions"]["resident_total"]
        )  # scores, regions its own set)


def _live_storages() -> dict:
    """data_ptr -> bytes of every CPU tensor storage alive now."""
    import gc

    gc.collect()
    out = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and not o.is_meta and o.device.type == "cpu":
            st = o.untyped_storage()
            if st.data_ptr():
                out[st.data_ptr()] = st.nbytes()
    return out


@pytest.mark.parametrize("strategy", ["none", "full"])
def test_a_run_leaves_no_tensor_storage_alive(tmp_path, strategy):
    """Runs in one process (Hydra's default launcher runs every job of a sweep in one) must not
    accumulate memory:
    once run() returns, no storage it made is alive. Two leaks this caught: the probe's saved-tensor
    hook returned
    the tensor itself, so a saved output held its own grad_fn (a C++ cycle, the probe's whole graph
    and model kept),
    and MemTracker left the probe model's parameters referenced."""
    before = _live_storages()
    run(compose_config([f"+strategy={strategy}", "trainer.steps=2", *FAST]), tmp_path)
    new = {p: n for p, n in _live_storages().items() if p not in before}
    assert sum(new.values()) == 0, f"{len(new)} storages, {sum(new.values())} bytes still alive"


def test_freezing_blocks_nest_and_leave_a_process_freeze_in_force():
    """older_objects_frozen freezes and thaws when no freeze is in force, and leaves one in force
    (an enclosing block's, a process's own) neither thawed nor extended. A fresh interpreter: this
    test's worker holds a freeze of its own (conftest)."""
    # (frozen objects that refcounting frees leave the frozen count: compare with margins)
    code = """
import gc
from recompute_lab.measure.memory import freeze_older_objects, older_objects_frozen
assert gc.get_freeze_count() == 0
with older_objects_frozen():
    frozen = gc.get_freeze_count()
    assert frozen > 0
    made = [object() for _ in range(1000)]
    with older_objects_frozen():
        assert gc.get_freeze_count() <= frozen  # nested: the 1000 new objects not frozen
    assert gc.get_freeze_count() > 0  # nor the freeze thawed by the inner block
assert gc.get_freeze_count() == 0  # the outer block thaws its own
freeze_older_objects()
with older_objects_frozen():
    assert gc.get_freeze_count() > 0
assert gc.get_freeze_count() > 0  # the process's freeze stays in force
print("ok")
"""
    # a freeze in force before the module is imported (a forking server's) counts as the process's
    before = """
import gc
gc.freeze()
from recompute_lab.measure.memory import older_objects_frozen
with older_objects_frozen():
    pass
assert gc.get_freeze_count() > 0
print("ok")
"""
    for source in (code, before):
        out = subprocess.run(
            [sys.executable, "-c", source], capture_output=True, text=True, timeout=120, cwd=ROOT
        )
        assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
