"""The strategy catalogue: every strategy gives the gradients and loss history of `none`, and its
memory and
FLOP effects are measured, not assumed.

Two independent byte counts of what a forward leaves for backward (parameters, buffers and inputs
excluded,
deduplicated by storage):
- `hooked_bytes`: a saved_tensors_hooks counter, i.e. what autograd packs;
- `retained_bytes`: every storage created during the forward that is still alive once it returns
(found with a
  TorchDispatchMode holding only weak references), i.e. what the graph keeps, whatever keeps it.
They agree to the byte except where tensors bypass saved_tensors_hooks (the SAC cache of `op`, the
save_on_cpu copies of `offload`), which is why orderings are asserted on `retained_bytes`.
"""

from __future__ import annotations

import copy
import functools
import gc
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.checkpoint import CheckpointPolicy

from recompute_lab.config import ConfigError
from recompute_lab.run.engine import run
from recompute_lab.model.gpt import build_model
from recompute_lab.strategies.wrap import draws_random, make_policy
from recompute_lab.cli.overrides import compose_run_config
from recompute_lab.strategies import STRATEGIES, apply_strategy
from recompute_lab.config.spec import RunSpec

from conftest import (
    cached_compose,
    one_thread_fixture,
    CONF_DIR,
    FAST,
    compose_config,
    load_results,
    run_cli,
)

N_LAYER = 4  # layers(block, n_layer/2), uniform chunks and every-N need more than tiny's 2 blocks
MODEL = ["model=tiny", f"model.n_layer={N_LAYER}", "model.dropout=0.1"]
# Loss histories: tiny at its own 2 blocks, short sequences (20 steps x 16 runs must stay quick).
HISTORY = [
    "model.n_layer=2",
    "data.batch_size=2",
    "data.seq_len=16",
    "trainer.num_threads=1",
    "trainer.steps=20",
]

# One or more configurations of every strategy: (test id, overrides).
VARIANTS = [
    ("none", ["+strategy=none"]),
    ("full", ["+strategy=full"]),
    ("selective", ["+strategy=selective"]),
    ("selective-attn-mlp-norm", ["+strategy=selective", "strategy.modules=[attn,mlp,norm]"]),
    ("layers-uniform2", ["+strategy=layers", "strategy.method=uniform", "strategy.num_layers=2"]),
    (
        "layers-block2",
        ["+strategy=layers", "strategy.method=block", f"strategy.num_layers={N_LAYER // 2}"],
    ),
    ("layers-every2", ["+strategy=layers", "strategy.method=every", "strategy.every=2"]),
    ("sqrt", ["+strategy=sqrt"]),
    ("op", ["+strategy=op"]),
    ("op-every-other-mm", ["+strategy=op", "strategy.every_other_mm=true"]),
    ("regions", ["+strategy=regions"]),
    ("regions-save-none", ["+strategy=regions", "strategy.save=[]"]),
    ("regions-core-act", ["+strategy=regions", "strategy.save=[attn.core,mlp.act]"]),
    ("offload", ["+strategy=offload"]),
    ("full-offload", ["+strategy=full", "strategy.offload=true"]),
]
ATTENTION = ["eager", "sdpa"]
GRADIENTS_TESTED_ELSEWHERE = {"budget": "tests/integration/test_budget.py"}


def test_every_registered_strategy_has_a_gradient_variant():
    """A new strategy is not done until its gradients are compared with `none` here (or where it
    says)."""
    covered = {
        o.split("=", 1)[1]
        for _, overrides in VARIANTS
        for o in overrides
        if o.startswith("+strategy=")
    }
    assert set(STRATEGIES) - set(GRADIENTS_TESTED_ELSEWHERE) <= covered


one_thread = pytest.fixture(autouse=True, scope="module")(one_thread_fixture)
compose = cached_compose


@functools.lru_cache(maxsize=None)
def base_model(attention: str):
    torch.manual_seed(0)
    return build_model(compose(*MODEL, f"model.attention={attention}").model).train()


def strategic(attention: str, overrides: list[str]):
    """A copy of the shared base model with the strategy applied (offload's CPU warning
    silenced)."""
    cfg = compose(*MODEL, f"model.attention={attention}", *overrides)
    model = copy.deepcopy(base_model(attention))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = apply_strategy(model, cfg.strategy, RunSpec.of(cfg).shape()).to_dict()
    return model, plan


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 32), generator=g), torch.randint(0, 256, (2, 32), generator=g)


def grads(model, seed=123):
    idx, tgt = batch()
    torch.manual_seed(seed)  # the same dropout draws in every run
    model.zero_grad(set_to_none=True)
    model(idx, tgt).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("vid,overrides", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_gradients_equal_none(vid, overrides, attention):
    model, plan = strategic(attention, overrides)
    g_none, g = grads(base_model(attention)), grads(model)
    assert [n for n, _ in model.named_parameters()] == list(g_none)  # no renamed parameters
    for name in g_none:
        assert (g_none[name] - g[name]).abs().max().item() <= 1e-6, name
    # The plan contract: JSON-able, and every recomputed name is a real module.
    json.dumps(plan)
    assert {
        "name",
        "recomputed",
        "saved",
        "description",
        "offload",
        "offload_effective",
        "warnings",
    } <= set(plan)
    modules = dict(model.named_modules())
    assert all(name in modules for name in plan["recomputed"])


LLAMA_STYLE = [
    "model.norm=rmsnorm",
    "model.mlp=swiglu",
    "model.positions=rope",
    "model.n_kv_head=2",
    "model.bias=false",
    "model.attention=sdpa",
]


@pytest.mark.parametrize(
    "vid,overrides",
    [v for v in VARIANTS if v[0] in ("selective", "op", "regions")],
    ids=["selective", "op", "regions"],
)
def test_llama_style_blocks_gradients_equal_none(vid, overrides):
    """RMSNorm, SwiGLU, RoPE (a bare op on the qkv output inside a remat region), GQA, bias-free
    Linear (mm)."""
    torch.manual_seed(0)
    base = build_model(compose(*MODEL, *LLAMA_STYLE).model).train()
    model = copy.deepcopy(base)
    cfg = compose(*MODEL, *LLAMA_STYLE, *overrides)
    apply_strategy(model, cfg.strategy, RunSpec.of(cfg).shape())
    g_none, g = grads(base), grads(model)
    assert all((g_none[n] - g[n]).abs().max().item() <= 1e-6 for n in g_none)


@pytest.mark.parametrize("attention", ATTENTION)
def test_dropout_acts_so_rng_preservation_is_tested(attention):
    model = base_model(attention)
    w = "blocks.0.mlp.fc.weight"
    assert not torch.equal(grads(model, seed=1)[w], grads(model, seed=2)[w])


@functools.lru_cache(maxsize=None)
def loss_history(attention: str, overrides: tuple[str, ...], tmp: str) -> list[float]:
    cfg = compose_config([*MODEL, f"model.attention={attention}", *HISTORY, *FAST, *overrides])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run(cfg, Path(tmp) / f"{attention}_{'_'.join(overrides)}")
    assert res["status"] == "ok"
    return res["loss"]["history"]


# One configuration per strategy is enough here: the gradient test covers the variants.
HISTORY_VARIANTS = [
    v
    for v in VARIANTS
    if v[0] in ("full", "selective", "layers-uniform2", "sqrt", "op", "regions", "full-offload")
]


@pytest.mark.cover()  # each value once in the fast run; the full product with -m slow
@pytest.mark.parametrize("attention", ATTENTION)
@pytest.mark.parametrize("vid,overrides", HISTORY_VARIANTS, ids=[v[0] for v in HISTORY_VARIANTS])
def test_20_step_loss_history_matches_none(vid, overrides, attention, tmp_path_factory):
    tmp = str(tmp_path_factory.getbasetemp())
    ref = loss_history(attention, ("+strategy=none",), tmp)
    hist = loss_history(attention, tuple(overrides), tmp)
    assert len(hist) == len(ref) == 20 and ref[-1] < ref[0]
    assert max(abs(a - b) for a, b in zip(hist, ref)) <= 1e-6


# --- saved activation bytes -----------------------------------------------------------------------


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _excluded(model, *inputs) -> set[int]:
    return {_key(t) for t in (*model.parameters(), *model.buffers(), *inputs)}


def hooked_bytes(model) -> int:
    """Bytes of the distinct storages autograd packs through saved_tensors_hooks in one forward."""
    idx, tgt = batch()
    skip, seen = _excluded(model, idx, tgt), {}

    def pack(t):
        if _key(t) not in skip:
            seen[_key(t)] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(123)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(idx, tgt)
    del loss
    return sum(seen.values())


class _NewStorages(TorchDispatchMode):
    """Weak references to the storage of every op output (holds no tensor, frees nothing later)."""

    def __init__(self):
        super().__init__()
        self.refs: list[tuple[StorageWeakRef, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.refs.append((StorageWeakRef(s), s.data_ptr(), s.nbytes()))
        return out


def retained_bytes(model) -> int:
    """Bytes of storages made in the forward that the autograd graph still keeps alive when it
    returns."""
    idx, tgt = batch()
    torch.manual_seed(123)
    with _NewStorages() as mode:
        loss = model(idx, tgt)
    gc.collect()
    skip = _excluded(model, idx, tgt, loss)
    # Dedup among live storages only: a freed storage's address may be reused by a later, live one.
    live = {ptr: n for ref, ptr, n in mode.refs if not ref.expired() and ptr not in skip}
    del loss
    return sum(live.values())


ORDERED = {
    "none",
    "full",
    "selective",
    "layers-block2",
    "layers-uniform2",
    "sqrt",
    "op",
    "op-every-other-mm",
    "regions",
    "regions-save-none",
    "offload",
}
HOOK_BLIND = {
    "op",
    "op-every-other-mm",
    "offload",
    "full-offload",
}  # SAC cache / save_on_cpu copies


@pytest.mark.parametrize("attention", ATTENTION)
def test_saved_bytes_orderings(attention):
    retained, hooked = {}, {}
    for vid, overrides in [v for v in VARIANTS if v[0] in ORDERED]:
        model, _ = strategic(attention, overrides)
        retained[vid], hooked[vid] = retained_bytes(model), hooked_bytes(model)
        if vid not in HOOK_BLIND:  # two independent counts agree to the byte
            assert hooked[vid] == retained[vid], vid
    r = retained
    assert r["full"] < r["layers-block2"] < r["none"]
    assert r["selective"] < r["none"]
    assert r["full"] < r["op-every-other-mm"] < r["op"] < r["none"]  # SAC keeps matmul outputs
    assert hooked["op"] == hooked["full"]  # ...in a cache saved_tensors_hooks never sees
    assert r["regions-save-none"] == r["full"]  # a remat region saving nothing = full recomputation
    assert r["full"] < r["regions"] < r["none"]
    assert (
        r["sqrt"] <= r["full"] and r["layers-uniform2"] < r["full"]
    )  # fewer checkpoint inputs kept
    assert (
        r["offload"] == r["none"]
    )  # on CPU the save_on_cpu copies replace the originals: nothing freed


def test_selective_saves_the_scores_with_eager_attention():
    # Korthikanti's regime: eager attention stores the (b, h, s, s) scores, selective drops them.
    none, _ = strategic("eager", ["+strategy=none"])
    sel, _ = strategic("eager", ["+strategy=selective"])
    b, h, s = 2, 4, 32
    assert (
        retained_bytes(none) - retained_bytes(sel) >= N_LAYER * b * h * s * s * 4
    )  # fp32 scores, per block


# --- FLOPs ----------------------------------------------------------------------------------------


def backward_flops(model) -> int:
    idx, tgt = batch()
    torch.manual_seed(123)
    loss = model(idx, tgt)
    with FlopCounterMode(display=False) as fc:
        loss.backward()
    return fc.get_total_flops()


def block_forward_flops(model) -> int:
    idx, tgt = batch()
    with FlopCounterMode(display=False) as fc:
        model(idx, tgt)
    counts = fc.get_flop_counts()
    return sum(sum(counts[f"GPT.blocks.{i}"].values()) for i in range(N_LAYER))


@pytest.mark.parametrize("attention", ATTENTION)
def test_recompute_flops(attention):
    extra = {}
    none_bwd = backward_flops(base_model(attention))
    for vid, overrides in [
        *VARIANTS,
        ("op-mm-only", ["+strategy=op", "strategy.save_ops=[aten.mm]"]),
    ]:
        model, _ = strategic(attention, overrides)
        extra[vid] = backward_flops(model) - none_bwd
    assert extra["none"] == 0 and extra["offload"] == 0
    assert extra["selective"] > 0
    assert extra["full"] == block_forward_flops(
        base_model(attention)
    )  # exactly one forward of every block
    assert all(v <= extra["full"] for v in extra.values()), extra
    assert (
        extra["sqrt"] == extra["layers-uniform2"] == extra["full"]
    )  # groups still rerun every block once
    assert 0 < extra["layers-block2"] < extra["full"]
    assert (
        extra["op"] == 0 < extra["op-every-other-mm"]
    )  # counted FLOPs: only recomputed matmuls count
    assert extra["regions-save-none"] == extra["full"]
    # DESIGN pitfall: Linear with bias is addmm, so saving only aten.mm recomputes every matmul =
    # full.
    assert extra["op-mm-only"] == extra["full"]


# --- op policy, offload, plans --------------------------------------------------------------------


def test_sac_policy_every_other_mm_and_random_attention():
    aten = torch.ops.aten
    policy = make_policy(
        ["mm", "addmm", "_scaled_dot_product_flash_attention_for_cpu"], every_other_mm=True
    )
    got = [
        policy(None, aten.addmm.default),
        policy(None, aten.mm.default),
        policy(None, aten.addmm.default),
        policy(None, aten.gelu.default),
    ]
    S, R = CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_RECOMPUTE
    assert got == [S, R, S, R]  # torchtitan: the 2nd, 4th... projection matmul recomputed
    sdpa = aten._scaled_dot_product_flash_attention_for_cpu.default
    q = torch.zeros(1, 1, 2, 2)
    assert not draws_random(sdpa, (q, q, q, 0.0), {}) and draws_random(sdpa, (q, q, q, 0.1), {})
    assert policy(None, sdpa, q, q, q, 0.1) == R and policy(None, sdpa, q, q, q) == S
    assert draws_random(aten.bernoulli_.float, (q,), {})


def test_offload_on_cpu_says_it_moves_nothing():
    cfg = compose_config(["+strategy=offload"])
    model = build_model(cfg.model)
    with pytest.warns(UserWarning, match="moves nothing"):
        plan = apply_strategy(model, cfg.strategy, RunSpec.of(cfg).shape()).to_dict()
    assert plan["offload"] is True and plan["offload_effective"] is False
    assert any("moves nothing" in w for w in plan["warnings"]) and plan["recomputed"] == []


def test_plans_name_what_they_do():
    _, sel = strategic("eager", ["+strategy=selective"])
    assert sel["recomputed"] == [f"blocks.{i}.attn.core" for i in range(N_LAYER)]
    _, uni = strategic(
        "eager", ["+strategy=layers", "strategy.method=uniform", "strategy.num_layers=3"]
    )
    assert uni["regions"] == [[0, 1, 2], [3]] and uni["recomputed"] == [
        f"blocks.{i}" for i in range(4)
    ]
    _, blk = strategic("eager", ["+strategy=layers", "strategy.num_layers=2"])
    assert blk["regions"] == [[0], [1]]
    _, every = strategic("eager", ["+strategy=layers", "strategy.method=every", "strategy.every=2"])
    assert every["regions"] == [[1], [3]]
    _, sq = strategic("eager", ["+strategy=sqrt"])
    assert sq["regions"] == [[0, 1], [2, 3]]
    _, op = strategic("sdpa", ["+strategy=op"])
    assert {"aten.mm", "aten.addmm", "aten.bmm"} <= set(op["save_ops"])
    assert any("scaled_dot_product" in o for o in op["save_ops"])
    _, reg = strategic("eager", ["+strategy=regions", "strategy.save=[mlp.fc]"])
    assert (
        reg["save"] == ["mlp.fc"]
        and "mlp.proj" in reg["recompute"]
        and "blocks.0.mlp.proj" in reg["recomputed"]
    )


@pytest.mark.parametrize(
    "name", ["full", "selective", "layers", "sqrt", "op", "regions", "offload"]
)
def test_strategies_run_on_the_meta_device(name):
    """The estimate path builds models on meta (no memory): every strategy must apply and run there
    too."""
    cfg = compose(*MODEL, f"+strategy={name}")
    model = build_model(cfg.model, "meta").train()
    plan = apply_strategy(model, cfg.strategy, RunSpec.of(cfg).shape()).to_dict()
    idx = torch.zeros(2, 16, dtype=torch.long, device="meta")
    model(idx, idx).backward()
    assert plan["offload_effective"] is False


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["+strategy=layers", "strategy.num_layers=5"], "valid values: 1..4"),
        (["+strategy=layers", "strategy.num_layers=0"], "valid values: 1..4"),
        (["+strategy=layers", "strategy.method=every", "strategy.every=0"], "valid values: 1..4"),
        (
            ["+strategy=selective", "strategy.modules=[core_attn,mlpp]"],
            "'mlpp'; valid: core_attn, attn, mlp, norm",
        ),
        (
            ["+strategy=op", "strategy.save_ops=[aten.mm,aten.matmul]"],
            "'matmul'; valid: mm, addmm, bmm",
        ),
        (
            ["+strategy=regions", "strategy.save=[attn.score]"],
            "'attn.score'; valid: norm1, attn.qkv, attn.core",
        ),
    ],
)
def test_bad_strategy_options_raise_config_error_listing_valid(overrides, needle):
    cfg = compose_config([*MODEL, *overrides])
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("[", r"\[")):
        apply_strategy(build_model(cfg.model), cfg.strategy, RunSpec.of(cfg).shape())


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (
            ["+strategy=full", "strategy.num_layers=2"],
            "strategy.num_layers is not an option of strategy 'full'; its options: offload",
        ),
        (
            ["+strategy=op", "strategy.save=[mlp.fc]"],
            "its options: save_ops, every_other_mm, offload",
        ),
    ],
)
def test_options_of_another_strategy_are_rejected(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):  # before Hydra composes
        compose_run_config([*MODEL, *overrides])
    # Forced in with a `+`, the same option composes; the strategy refuses it before anything is
    # built.
    cfg = compose(*MODEL, *[("+" + o if o.startswith("strategy.") else o) for o in overrides])
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        apply_strategy(build_model(cfg.model), cfg.strategy, RunSpec.of(cfg).shape())


def test_transformer_only_strategies_reject_toy_mlp():
    cfg = compose_config(["model=toy_mlp", "+strategy=selective"])
    with pytest.raises(ConfigError, match="Valid strategies for it: none, full"):
        apply_strategy(build_model(cfg.model), cfg.strategy, RunSpec.of(cfg).shape())


def test_unknown_layer_method_fails_at_compose_time():
    with pytest.raises(Exception) as err:
        compose_config(["+strategy=layers", "strategy.method=blocks"])
    assert "uniform, block, every" in str(err.value.__cause__)


# --- registry and CLI sweep -----------------------------------------------------------------------


def strategy_files() -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted((Path(CONF_DIR) / "strategy").glob("*.yaml"))}


def test_every_config_is_a_registered_strategy_and_back():
    files = strategy_files()
    assert set(files) == set(STRATEGIES)
    for stem, text in files.items():
        assert (
            text.startswith("# ") and f"/schema/strategy/{stem}@_here_\n" in text
        )  # says what it does; its schema


def test_glob_sweep_runs_every_strategy_and_nothing_else(tmp_path):
    proc = run_cli(
        [
            "-m",
            "+strategy=glob(*)",
            "model=tiny",
            "trainer.steps=2",
            *FAST,
            "trainer.num_threads=1",
            "trainer.probe=false",  # the memory probe of every strategy is tested elsewhere
            "hydra.callbacks.analyze.enabled=false",  # figures of 9 runs: ~9 s, not read here
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [load_results(p) for p in sorted((tmp_path / "sweep").glob("*/results.json"))]
    assert sorted(r["strategy"]["name"] for r in results) == sorted(strategy_files())
    assert all(r["status"] == "ok" for r in results)
