"""The budget strategy: plans fit their budget (measured by an independent counter on the whole
model), are
optimal for their cost model (brute force over every per-block assignment, and every fixed strategy
priced by
the same cost model), keep the gradients of `none`, and refuse infeasible budgets clearly."""

from __future__ import annotations

import functools
import itertools
import json
import re
import time

import pytest
import torch

from recompute_lab.strategies import budget as B
from recompute_lab.cli.overrides import compose_run_config
from recompute_lab.config import ConfigError
from recompute_lab.run.engine import run
from recompute_lab.model.gpt import build_model
from recompute_lab.model.precision import make_precision
from recompute_lab.strategies import Shape, apply_strategy, parse_options
from recompute_lab.config.spec import RunSpec
from recompute_lab.predict import prediction
from recompute_lab.predict.devices import Device

from conftest import (
    cached_compose,
    one_thread_fixture,
    FAST,
    compose_config,
    load_results,
    retained_bytes,
)
from docs_text import page, section

N_LAYER = 3
BATCH, SEQ = 2, 16
MODEL = [
    "model=tiny",
    f"model.n_layer={N_LAYER}",
    "model.dropout=0.1",
    f"data.batch_size={BATCH}",
    f"data.seq_len={SEQ}",
]
# Fixed strategies the plan must beat wherever they fit (test id, overrides).
FIXED = [
    ("none", ["+strategy=none"]),
    ("full", ["+strategy=full"]),
    ("selective", ["+strategy=selective"]),
    ("selective-mlp", ["+strategy=selective", "strategy.modules=[mlp]"]),
    ("selective-attn-mlp-norm", ["+strategy=selective", "strategy.modules=[attn,mlp,norm]"]),
    ("layers-block1", ["+strategy=layers", "strategy.method=block", "strategy.num_layers=1"]),
    ("layers-block2", ["+strategy=layers", "strategy.method=block", "strategy.num_layers=2"]),
    ("layers-every2", ["+strategy=layers", "strategy.method=every", "strategy.every=2"]),
    ("layers-uniform2", ["+strategy=layers", "strategy.method=uniform", "strategy.num_layers=2"]),
    ("sqrt", ["+strategy=sqrt"]),
    ("op", ["+strategy=op"]),
    ("op-every-other-mm", ["+strategy=op", "strategy.every_other_mm=true"]),
    ("regions", ["+strategy=regions"]),
    ("regions-core-act", ["+strategy=regions", "strategy.save=[attn.core,mlp.act]"]),
]
FLOP_BOUND = (
    "none",
    "full",
    "selective",
    "layers",
    "sqrt",
)  # the plan's recompute FLOPs are <= theirs


one_thread = pytest.fixture(autouse=True, scope="module")(one_thread_fixture)
compose = cached_compose


def fresh(attention: str, overrides=("+strategy=none",)):
    cfg = compose(*MODEL, f"model.attention={attention}", *overrides)
    torch.manual_seed(0)
    return build_model(cfg.model).train(), cfg


@functools.lru_cache(maxsize=None)
def probed(attention: str) -> B.Probed:
    model, cfg = fresh(attention, ["+strategy=budget"])
    return B.probe_model(model, RunSpec.of(cfg).shape())


def planned(attention: str, extra: tuple[str, ...]):
    model, cfg = fresh(attention, ["+strategy=budget", *extra])
    return model, B.solve(
        model, parse_options(cfg.strategy), RunSpec.of(cfg).shape(), probed(attention)
    ).to_dict()


# --- an independent byte count on the whole model -------------------------------------------------


def saved_bytes(model, autocast=None, batch=BATCH, seq=SEQ) -> int:
    """Bytes of the storages the forward made that are still alive once it returns (what backward
    keeps), plus the int64 token ids and targets the embedding's and the loss's backward keep (16 B
    per token); the forward under CPU autocast to ``autocast`` when given, as the training loop runs
    it."""
    idx = torch.arange(batch * seq).reshape(batch, seq) % 256
    targets = idx.roll(-1, dims=1)
    torch.manual_seed(5)

    def forward():
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            return model(idx, targets)

    made = retained_bytes(forward, (*model.parameters(), *model.buffers(), idx, targets))[0]
    return made + idx.nbytes + targets.nbytes


def priced(model, none_measured: B.Measured) -> tuple[int, tuple[int, int]]:
    """(activation bytes, (recompute FLOPs, pointwise bytes)) of a whole model, by the planner's
    cost model."""
    m = B.measure_step(model, BATCH, SEQ)
    return m.activation_bytes, (
        m.backward_flops - none_measured.backward_flops,
        m.pointwise_bytes - none_measured.pointwise_bytes,
    )


@functools.lru_cache(maxsize=None)
def fixed_prices(attention: str) -> dict:
    none = B.measure_step(fresh(attention)[0], BATCH, SEQ)
    out = {}
    for vid, overrides in FIXED:
        model, cfg = fresh(attention, overrides)
        apply_strategy(model, cfg.strategy, RunSpec.of(cfg).shape())
        out[vid] = priced(model, none)
    return out


def budget_grid(attention: str, n: int = 7) -> list[int]:
    """From full recomputation's bytes (the least the planner reaches) up to none's."""
    p = probed(attention)
    low = p.outside.bytes + N_LAYER * min(x.bytes for x in p.prices)
    high = p.outside.bytes + N_LAYER * p.prices[0].bytes
    return [low + (high - low) * k // (n - 1) for k in range(n)]


# --- tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_plans_fit_and_beat_every_fitting_fixed_strategy(attention):
    fixed = fixed_prices(attention)
    none = B.measure_step(fresh(attention)[0], BATCH, SEQ)
    assert (
        fixed["none"][0] == budget_grid(attention)[-1]
    )  # whole-model none = outside + L x one-block none
    for budget in budget_grid(attention, n=6):
        model, plan = planned(attention, (f"strategy.budget_bytes={budget}",))
        measured = saved_bytes(model)
        assert measured <= budget and measured == plan["predicted_activation_bytes"], (
            budget,
            plan["chosen"],
        )
        nbytes, cost = priced(model, none)
        assert (
            nbytes == measured and list(cost) == plan["cost"]
        )  # per-block prices add up to the whole model
        assert cost[0] == plan["predicted_recompute_flops"]
        for vid, (sbytes, scost) in fixed.items():
            if sbytes <= budget:
                assert cost <= scost, (budget, vid, plan["chosen"])
                if vid.startswith(FLOP_BOUND):
                    assert cost[0] <= scost[0], (budget, vid)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_brute_force_over_every_per_block_assignment(attention):
    p = probed(attention)
    k = len(p.options)
    # Premise of the brute force: a mixed assignment's whole-model figures are the sum of its
    # blocks' prices.
    none = B.measure_step(fresh(attention)[0], BATCH, SEQ)
    for combo in [(k - 1, 0, k // 2), (1, k - 3, 7)]:
        model, _ = fresh(attention)
        for i, o in enumerate(combo):
            B.apply_option(model, i, p.options[o])
        nbytes, cost = priced(model, none)
        assert nbytes == p.outside.bytes + sum(p.prices[o].bytes for o in combo)
        assert cost == tuple(
            map(sum, zip(*[(p.prices[o].flops, p.prices[o].pointwise_bytes) for o in combo]))
        )
    combos = [
        (
            p.outside.bytes + sum(p.prices[o].bytes for o in c),
            tuple(map(sum, zip(*[(p.prices[o].flops, p.prices[o].pointwise_bytes) for o in c]))),
        )
        for c in itertools.product(range(k), repeat=N_LAYER)
    ]
    for budget in budget_grid(attention, n=11):
        best = min(cost for nbytes, cost in combos if nbytes <= budget)
        _, plan = planned(attention, (f"strategy.budget_bytes={budget}",))
        assert tuple(plan["cost"]) == best, budget


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_gradients_equal_none(attention):
    ref, _ = fresh(attention)
    idx = torch.arange(BATCH * SEQ).reshape(BATCH, SEQ) % 256

    def grads(model):
        torch.manual_seed(11)
        model(idx, idx).backward()
        return {n: q.grad.clone() for n, q in model.named_parameters()}

    want = grads(ref)
    grid = budget_grid(attention, n=4)
    chosen = set()
    for budget in grid:
        model, plan = planned(attention, (f"strategy.budget_bytes={budget}",))
        chosen |= set(plan["chosen"])
        got = grads(model)
        assert max((got[n] - want[n]).abs().max().item() for n in want) <= 1e-6, plan["chosen"]
    assert len(chosen) >= 3  # the grid exercises several kinds of option


def test_budget_sources_and_fraction_default():
    p = probed("eager")
    none_bytes = p.outside.bytes + N_LAYER * p.prices[0].bytes
    _, plan = planned("eager", ())
    assert plan["budget"] == {
        "bytes": int(0.5 * none_bytes),
        "source": f"budget_fraction=0.5 of none's {none_bytes} B",
    }
    _, plan = planned("eager", ("strategy.budget_fraction=1.0",))
    assert plan["chosen"] == ["none"] * N_LAYER and plan["predicted_recompute_flops"] == 0
    state = 16 * fresh("eager")[0].get_num_params()  # fp32 + AdamW: 16 B per parameter
    _, plan = planned("eager", (f"strategy.device_memory_gb={(state + 400_000) / 1e9}",))
    budget = plan["budget"]
    bare = budget["phases_without_activations"][budget["binding_phase"]]
    assert budget["model_state_bytes"] == state and budget["bytes"] == state + 400_000 - bare
    json.dumps(plan)


def test_device_memory_plans_against_every_phase_of_the_step_peak():
    """device_memory_gb bounds the step's predicted peak (every phase, optimizer step included),
    not saved activations plus model state: the plan's peak fits, the binding phase is named, and a
    device the optimizer step overflows with nothing saved is refused naming that phase (the old
    rule, device minus model state, planned there)."""
    model, cfg = fresh("eager", ["+strategy=budget"])
    shape, n = RunSpec.of(cfg).shape(), model.get_num_params()
    bare = prediction.step_peak(cfg.model, shape, 0, 0, n)["phases"]
    p = probed("eager")
    none_bytes = p.outside.bytes + N_LAYER * p.prices[0].bytes
    # half of none's activations fit beside backward_start, unless a later phase needs more
    device = max(bare["backward_start"] + none_bytes // 2, max(bare.values()))
    model, plan = planned("eager", (f"strategy.device_memory_gb={device / 1e9}",))
    peak, budget = plan["predicted_peak"], plan["budget"]
    assert peak["total"] <= device and peak["phases"].keys() >= {"optimizer_step"}
    assert plan["binding_phase"] == budget["binding_phase"] in peak["phases"]
    assert plan["predicted_activation_bytes"] <= budget["bytes"]
    assert saved_bytes(model) == plan["predicted_activation_bytes"]
    assert plan["device_fit"]["fits"] and plan["device_fit"]["margin_bytes"] >= 0
    # every phase but the binding one may hold one more byte; the binding one may not
    after = prediction.step_peak(
        cfg.model, shape, budget["bytes"] + 1, budget["largest_region"], n
    )["phases"]
    assert after[budget["binding_phase"]] > device
    worst = max(bare, key=bare.get)
    state = prediction.model_state(cfg.model, shape, n)["total"]
    assert state < bare[worst] - 1
    with pytest.raises(ConfigError, match=f"the {worst} phase of the predicted step peaks at"):
        apply_strategy(
            model,
            parse_options(
                compose(
                    *MODEL,
                    "+strategy=budget",
                    f"strategy.device_memory_gb={(bare[worst] - 1) / 1e9}",
                ).strategy
            ),
            shape,
        )


def test_device_memory_on_cuda_keeps_the_tools_reserve():
    """On CUDA the step may use the device less recompute_lab.predict.devices' reserve (context,
    NCCL per data-parallel communicator, fragmentation), as the per-GPU estimate does."""
    opts = parse_options(
        compose(*MODEL, "+strategy=budget", "strategy.device_memory_gb=40").strategy
    )
    shape = Shape(BATCH, SEQ, "bf16_master", device="cuda", parallel="fsdp", world_size=8)
    cfg = compose(*MODEL, "+strategy=budget")
    budget = B.resolve_budget(opts, 1, 10**6, shape, cfg.model)
    device = Device(40 * 10**9, "40 GB")
    assert budget["peak_limit"] == device.budget(1) and budget["reserve"]["communication"] > 0
    assert budget["reserve"] == device.reserve.parts(budget["peak_limit"], 1)


@pytest.mark.parametrize(
    "extra,needle",
    [
        (("strategy.budget_bytes=1",), r"smallest reachable is {full} B \(full recomputation"),
        (("strategy.device_memory_gb=0.0001",), "model state alone"),
        (("strategy.budget_fraction=0",), r"budget_fraction must be in \(0, 1\]"),
        (("strategy.budget_fraction=1.5",), r"budget_fraction must be in \(0, 1\]"),
        (("strategy.budget_bytes=100000", "strategy.device_memory_gb=80"), "not both"),
    ],
)
def test_infeasible_or_bad_budgets_raise_config_error(extra, needle):
    needle = needle.replace("{full}", str(fixed_prices("eager")["full"][0]))
    model, cfg = fresh("eager", ["+strategy=budget", *extra])
    with pytest.raises(ConfigError, match=needle):
        apply_strategy(model, cfg.strategy, RunSpec.of(cfg).shape())


def test_budget_options_belong_to_budget_only():
    with pytest.raises(ConfigError, match="budget_fraction is not an option of strategy 'full'"):
        compose_run_config([*MODEL, "+strategy=full", "strategy.budget_fraction=0.3"])
    model, cfg = fresh(
        "eager", ["+strategy=full", "+strategy.budget_fraction=0.3"]
    )  # forced in with a `+`
    with pytest.raises(ConfigError, match="budget_fraction is not an option of strategy 'full'"):
        apply_strategy(model, cfg.strategy, RunSpec.of(cfg).shape())


def test_objective_time_plan_fits():
    model, plan = planned("eager", ("strategy.objective=time", "strategy.budget_fraction=0.4"))
    assert (
        plan["objective"] == "time"
        and plan["roofline"]["bytes_per_s"] > 0
        and plan["roofline"]["flops"] > 0
    )
    assert saved_bytes(model) <= plan["budget"]["bytes"]


def test_cli_run_records_the_plan_and_its_counted_flops(tmp_path):
    cfg = compose_config(
        [
            *MODEL,
            "model.attention=eager",
            "+strategy=budget",
            "strategy.budget_fraction=0.3",
            "trainer.steps=2",
            "trainer.num_threads=1",
            *FAST,
        ]
    )
    results = run(cfg, tmp_path)
    assert results["status"] == "ok", results.get("error")
    plan = load_results(tmp_path / "results.json")["strategy"]
    assert plan["name"] == "budget" and len(plan["chosen"]) == N_LAYER
    assert plan["predicted_activation_bytes"] <= plan["budget"]["bytes"]
    # Eager attention (math path on CPU and on meta): the probe's FLOPs equal
    # recompute_lab.measure.flops' meta count.
    assert results["flops"]["per_step"]["recompute"] == plan["predicted_recompute_flops"]


def test_meta_device_plan_matches_the_cpu_plan_for_eager_attention():
    cfg = compose(*MODEL, "model.attention=eager", "+strategy=budget")
    meta = build_model(cfg.model, "meta").train()
    plan = apply_strategy(meta, cfg.strategy, RunSpec.of(cfg).shape()).to_dict()
    _, cpu = planned("eager", ())
    assert plan["chosen"] == cpu["chosen"] and plan["cost"] == cpu["cost"]
    assert plan["predicted_activation_bytes"] == cpu["predicted_activation_bytes"]


def test_meta_sdpa_probe_uses_a_fused_kernel_like_the_cpu():
    # Without dropout the CPU runs its fused SDPA kernel (no s^2 scores kept); on meta the probe
    # calls aten's
    # flash kernel rather than SDPA's math path. Bytes agree but for the flash kernel's RNG state
    # (24 B/block).
    cfg = compose(
        "model=tiny", f"model.n_layer={N_LAYER}", "model.attention=sdpa", "+strategy=budget"
    )
    on_meta = B.probe_model(build_model(cfg.model, "meta").train(), Shape(BATCH, SEQ))
    on_cpu = B.probe_model(build_model(cfg.model).train(), Shape(BATCH, SEQ))
    assert on_meta.outside == on_cpu.outside
    for m, c in zip(on_meta.prices, on_cpu.prices):
        assert m.flops == c.flops and 0 <= m.bytes - c.bytes <= 24


@pytest.mark.slow
def test_llama3_8b_on_meta_at_seq_8192_plans_in_seconds():
    """The budget example (docs/strategies.md): unsharded on 141 GB the optimizer step alone
    overflows (the planner used
    to budget 12.5 GB of activations there); sharded over 8 ranks on 40 GB cards it plans."""
    base = ["model=llama3_8b", "data.seq_len=8192", "data.batch_size=1", "precision=bf16_master"]
    cfg = compose_config([*base, "+strategy=budget", "strategy.device_memory_gb=141"])
    model = build_model(cfg.model, "meta", torch.bfloat16).train()
    with pytest.raises(ConfigError, match="the optimizer_step phase of the predicted step"):
        apply_strategy(model, cfg.strategy, RunSpec.of(cfg).shape("cuda"))
    cfg = compose_config([*base, "+strategy=budget", "strategy.device_memory_gb=40"])
    t0 = time.perf_counter()
    plan = apply_strategy(model, cfg.strategy, RunSpec.of(cfg).shape("cuda", "fsdp", 8)).to_dict()
    assert time.perf_counter() - t0 < 60  # ~25 s on 2 shared CPU cores
    assert plan["predicted_activation_bytes"] <= plan["budget"]["bytes"]
    assert len(plan["chosen"]) == 32 and plan["device_fit"]["fits"]
    text = " ".join(section(page("strategies"), "## Memory-budget planning").split())
    gb = {
        "leaves {} GB for saved activations": plan["budget"]["bytes"],
        "({} GB saved;": plan["predicted_activation_bytes"],
        "a predicted peak of {} GB": plan["predicted_peak"]["total"],
        "a margin of {} GB": plan["device_fit"]["margin_bytes"],
        "leaves the step {} GB;": plan["budget"]["peak_limit"],
        "`none` would save {} GB": plan["none_activation_bytes"],
    }
    for phrase, value in gb.items():
        assert phrase.format(f"{value / 1e9:.2f}") in text, phrase.format(f"{value / 1e9:.2f}")
    assert f"the {plan['binding_phase']} phase binds" in text
    with pytest.raises(ConfigError, match="model state alone"):  # 8B x 16 B = 128 GB > 80 GB
        small = compose_config([*base, "+strategy=budget", "strategy.device_memory_gb=80"])
        apply_strategy(
            build_model(cfg.model, "meta", torch.bfloat16),
            small.strategy,
            RunSpec.of(small).shape("cuda"),
        )


# --- every precision: the plan's bytes are priced in the run's own dtypes (autocast included)
# ---------------

LLAMA = [
    "model.norm=rmsnorm",
    "model.mlp=swiglu",
    "model.positions=rope",
    "model.n_kv_head=2",
    "model.bias=false",
    "model.tie_embeddings=false",
]
VARIANTS = {"tiny": [], "llama": LLAMA, "toy_mlp": ["model.arch=toy_mlp", "model.max_seq_len=1"]}


@pytest.mark.cover()  # each value once in the fast run; the full product with -m slow
@pytest.mark.parametrize("precision", ["fp32", "bf16_autocast", "bf16_master"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_plans_fit_their_budget_in_every_precision(variant, attention, precision):
    if variant == "toy_mlp" and attention == "eager":
        pytest.skip("toy blocks have no attention")
    seq = 1 if variant == "toy_mlp" else SEQ
    cfg = compose(
        *MODEL,
        f"data.seq_len={seq}",
        *VARIANTS[variant],
        f"model.attention={attention}",
        f"precision={precision}",
        "+strategy=budget",
    )
    policy = make_precision(cfg.precision)
    shape = RunSpec.of(cfg).shape()

    def fresh_model():
        torch.manual_seed(0)
        return build_model(cfg.model, "cpu", policy.param_dtype).train()

    p = B.probe_model(fresh_model(), shape)
    # Exact but for toy blocks under autocast (block 0 reads the fp32 embedding, later blocks bf16):
    # a bound.
    bound = variant == "toy_mlp" and precision == "bf16_autocast"
    assert p.param_dtype == policy.param_dtype and p.autocast == policy.autocast_dtype
    assert p.warnings == ([B.TOY_AUTOCAST] if bound else [])
    none = fresh_model()
    assert (
        saved_bytes(none, policy.autocast_dtype, seq=seq)
        <= p.outside.bytes + N_LAYER * p.prices[0].bytes
    )
    low = p.outside.bytes + N_LAYER * min(x.bytes for x in p.prices)
    high = p.outside.bytes + N_LAYER * p.prices[0].bytes
    for budget in [low + (high - low) * k // 4 for k in range(5)]:
        model = fresh_model()
        opts = parse_options(
            compose(*MODEL, "+strategy=budget", f"strategy.budget_bytes={budget}").strategy
        )
        plan = B.solve(model, opts, shape, p).to_dict()
        measured = saved_bytes(model, policy.autocast_dtype, seq=seq)
        assert measured <= plan["predicted_activation_bytes"] <= budget, (budget, plan["chosen"])
        assert measured == plan["predicted_activation_bytes"] or bound
        assert plan["warnings"] == p.warnings


def test_autocast_prices_count_the_weight_copies_and_fp32_inputs():
    """Under bf16 autocast a block saves bf16 copies of its Linear weights and keeps its norms' fp32
    inputs: a pure
    bf16 replica (what the planner used to price) misses both."""
    cfg = compose(*MODEL, "model.attention=sdpa", "precision=bf16_autocast", "+strategy=budget")
    model = build_model(cfg.model).train()
    auto = B.probe_model(model, RunSpec.of(cfg).shape())
    bf16 = B.probe_model(model, Shape(BATCH, SEQ, "bf16_master"))
    weights = sum(
        m.weight.numel() for m in model.blocks[0].modules() if isinstance(m, torch.nn.Linear)
    )
    none, full = auto.prices[0].bytes, min(x.bytes for x in auto.prices)
    assert none - bf16.prices[0].bytes >= 2 * weights
    assert B.kept_weight_copies(model, auto.options[0], 2) == 2 * weights
    assert (
        full
        == bf16.prices[auto.options.index(next(o for o in auto.options if o.kind == "block"))].bytes
        * 2
    )


def test_autocast_on_meta_is_an_upper_bound_with_a_warning():
    # dropout 0: the CPU runs its fused SDPA kernel, as the meta probe's flash kernel does
    cfg = compose(
        *MODEL,
        "model.dropout=0",
        "model.attention=sdpa",
        "precision=bf16_autocast",
        "+strategy=budget",
        "strategy.budget_fraction=0.5",
    )
    shape = RunSpec.of(cfg).shape()
    on_cpu = B.probe_model(build_model(cfg.model).train(), shape)
    meta = build_model(cfg.model, "meta").train()
    on_meta = B.probe_model(meta, shape)
    assert (
        on_meta.warnings == [B.AUTOCAST_ON_META] and on_meta.outside.bytes >= on_cpu.outside.bytes
    )
    assert all(
        m.bytes >= c.bytes and m.flops == c.flops for m, c in zip(on_meta.prices, on_cpu.prices)
    )
    plan = B.solve(meta, parse_options(cfg.strategy), shape, on_meta)
    assert plan.warnings == [B.AUTOCAST_ON_META]
    model = build_model(cfg.model).train()
    apply_strategy(
        model, cfg.strategy, shape, reuse=plan
    )  # the meta plan replayed on the CPU model
    measured = saved_bytes(model, torch.bfloat16)
    assert measured <= plan.predicted_activation_bytes <= plan.details["budget"]["bytes"]


@pytest.mark.slow
def test_small_autocast_plan_keeps_its_budget():
    """The audit's case: small, s=128, b=2, bf16 autocast. The planner priced `none` at 29.9 MB (a
    bf16 replica)
    where it saves 75.3 MB, and its 50% plan measured 1.86x its budget."""
    cfg = compose(
        "model=small",
        "data.seq_len=128",
        "data.batch_size=2",
        "precision=bf16_autocast",
        "+strategy=budget",
        "strategy.budget_bytes=14973954",
    )
    model = build_model(cfg.model, "meta").to_empty(device="cpu").train()
    plan = apply_strategy(model, cfg.strategy, RunSpec.of(cfg).shape()).to_dict()
    assert plan["none_activation_bytes"] == 75_312_132
    measured = saved_bytes(model, torch.bfloat16, batch=2, seq=128)
    assert measured == plan["predicted_activation_bytes"] <= 14_973_954


@pytest.mark.parametrize("variant", ["tiny", "llama"])
def test_meta_price_of_none_is_the_theorys_none_on_the_target_kernels(variant):
    """On meta the replicas save what the target's kernels save (native GQA SDPA, fused RMSNorm,
    bool dropout masks on cuda): `none` priced by the planner is theory's `none` to the byte, as
    estimate's meta count is."""
    extra = [*VARIANTS[variant], "model.attention=sdpa"]
    cfg = compose(*MODEL, *extra, "precision=bf16_master", "+strategy=budget")
    spec = RunSpec.of(cfg)
    for device in ("cuda", "cpu"):
        shape = spec.shape(device)
        p = B.probe_model(build_model(cfg.model, "meta", torch.bfloat16).train(), shape)
        ncfg = compose(*MODEL, *extra, "precision=bf16_master", "+strategy=none")
        none = apply_strategy(build_model(ncfg.model, "meta").train(), ncfg.strategy, shape)
        theory = prediction.predict(RunSpec.of(ncfg), none, shape).activations["total"]
        assert p.outside.bytes + N_LAYER * p.prices[0].bytes == theory, (variant, device)


def test_readme_quotes_the_unsharded_8b_failure():
    """The budget example (docs/strategies.md): Llama-3 8B unsharded at device_memory_gb=141 fails
    naming the optimizer step, with the figures the page quotes."""
    text = section(page("strategies"), "## Memory-budget planning")
    base = ["model=llama3_8b", "data.seq_len=8192", "data.batch_size=1", "precision=bf16_master"]
    cfg = compose(*base, "+strategy=budget", "strategy.device_memory_gb=141")
    opts, n = parse_options(cfg.strategy), 8_030_261_248
    with pytest.raises(ConfigError) as err:
        B.resolve_budget(opts, 1, n, RunSpec.of(cfg).shape("cuda"), cfg.model)
    message = str(err.value)
    quoted = re.search(r'"(the optimizer_step\s+phase .*? a step may use)"', text, re.S).group(1)
    head, tail = (" ".join(x.split()) for x in quoted.split("..."))
    assert message.startswith(head.strip()) and tail.strip() in message, message
    assert "13.55 GB reserved" in message and "13.55 GB reserved" in text
