"""Per-GPU memory under parallel layouts: PyTorch's tensor-parallel plans measured on the meta
device over a fake
process group equal recompute_lab.measure.tensor_parallel's theory to the byte; Korthikanti's TP/SP
formulas differ from
them by named terms only; model state per rank under FSDP x TP x PP; pipeline micro-batches in
flight counted on
PyTorch's own schedules against the closed forms; the layout's validation messages."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from recompute_lab.predict import layout as L
from recompute_lab.measure import tensor_parallel as T
from recompute_lab.predict import theory
from recompute_lab.predict.peak import ParamTensor
from recompute_lab.config import ConfigError, LayoutConfig, ModelConfig
from recompute_lab.config.spec import Shape

TPS = (1, 2, 4, 8)
STRATEGIES = ("none", "selective", "full")
# Llama-like (rmsnorm, swiglu, rope, flash SDPA, GQA) and Korthikanti's setting (layernorm, gelu,
# eager, dropout)
LLAMA = dict(
    n_layer=2,
    d_model=64,
    n_head=8,
    n_kv_head=8,
    d_ff=128,
    vocab_size=128,
    max_seq_len=32,
    norm="rmsnorm",
    mlp="swiglu",
    positions="rope",
    bias=False,
    tie_embeddings=False,
)
KORTHIKANTI = dict(
    n_layer=3,
    d_model=64,
    n_head=8,
    d_ff=256,
    vocab_size=128,
    max_seq_len=32,
    dropout=0.1,
    attention="eager",
    norm="layernorm",
    mlp="gelu",
    positions="rope",
    bias=True,
)
B, S = 2, 32


def cfg_of(kw: dict, **over):
    return OmegaConf.structured(ModelConfig(**{**kw, **over}))


@pytest.fixture(scope="module")
def world():
    with T.fake_world(8):
        yield


def measure(cfg, tp, sp, strategy):
    model, plan = T.build_parallel(cfg, tp, sp, {"name": strategy})
    measured = T.measure_rank(model, B, S, "cuda")
    pred = T.predict_rank(cfg, Shape(B, S, "bf16_master", device="cuda"), tp, sp, plan)
    return measured, pred


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kv", [8, 2])
def test_tp_rank_saved_bytes_on_meta_equal_theory_llama_like(world, strategy, kv):
    """Every tp in {1,2,4,8} (GQA: those dividing n_kv_head), SP on and off: the meta count of rank
    0's local
    shards equals the per-rank theory, byte for byte, module by module."""
    cfg = cfg_of(LLAMA, n_kv_head=kv)
    for tp in (t for t in TPS if kv % t == 0):
        for sp in (False, True):
            measured, pred = measure(cfg, tp, sp, strategy)
            assert measured["total"] == pred["total"], (tp, sp)
            assert measured["by_module"] == {k: v for k, v in pred["by_module"].items() if v}, (
                tp,
                sp,
            )


def named_differences(tp: int, sp: bool, strategy: str, h: int = 64, a: int = 8) -> dict:
    """Our model's per-layer bytes minus Korthikanti's sbh(10 + 24/t + 5as/(ht)) or sbh/t (34 +
    5as/h), term by
    term (16-bit, dropout, CUDA target: bool masks as Korthikanti assumes)."""
    sb, sbh, hd = S * B, S * B * h, h // a
    if strategy == "full":
        return {}  # the block input only: 2sbh (/t with SP), exactly Korthikanti's
    out = {
        "layernorm mean + rstd, fp32, two norms (sequence-split with SP)": 2
        * 2
        * 4
        * sb
        // (tp if sp else 1),
        "rope cos/sin cast to bf16 per call, q and k (whole on every rank)": 2
        * 2
        * S
        * hd
        // 2
        * 2,
        # PyTorch's SP saves the all-gathered (s, b, h) inputs of qkv and fc; Megatron keeps the 1/t
        # shard
        "SP: qkv and fc inputs saved all-gathered": 2 * (2 * sbh - 2 * sbh // tp) if sp else 0,
    }
    if strategy == "none":
        out["bool causal mask ~causal[:s, :s] per call (whole)"] = S * S
        if (
            a // tp == 1
        ):  # a (b, 1, s, hd) view of qkv is a valid bmm operand: the whole qkv output is saved
            out["one head per rank: v saved as a view of the whole qkv output (+q, k parts)"] = (
                4 * sbh // tp
            )
    else:  # selective: the core's checkpoint keeps rope q, k and the qkv output v is a view of
        out["selective: the region keeps rope q, k and the whole qkv output (v's storage)"] = (
            4 * sbh // tp
        )
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_tp_per_layer_is_korthikanti_plus_named_terms(world, strategy):
    cfg = cfg_of(KORTHIKANTI)
    for tp in TPS:
        for sp in (False, True):
            measured, pred = measure(cfg, tp, sp, strategy)
            assert measured["total"] == pred["total"], (tp, sp)
            layer = sum(v for k, v in measured["by_module"].items() if theory.covers("blocks.1", k))
            korthikanti = L.korthikanti_tp_layer_bytes(S, B, 64, 8, tp, sp, strategy)
            assert layer == korthikanti + sum(named_differences(tp, sp, strategy).values()), (
                tp,
                sp,
            )


def test_gathered_excess_names_the_sp_difference():
    cfg, st = cfg_of(LLAMA), Shape(B, S, "bf16_master", device="cuda")
    n, h = B * S, 64
    # per layer qkv + fc inputs (bf16) and the head's input: 3 + 2 (n_layer=2 -> 2 x 2 + 1 gathered
    # inputs)
    assert T.gathered_excess(cfg, st, 4, True) == 5 * (2 * n * h - 2 * n * h // 4)
    assert T.gathered_excess(cfg, st, 4, False) == 0


@pytest.mark.parametrize(
    "tp,ds,pp", [(1, 1, 1), (2, 1, 1), (1, 3, 1), (2, 3, 1), (4, 2, 1), (2, 2, 3)]
)
def test_model_state_per_rank_fsdp_x_tp_matches_pytorch_sharding(world, tp, ds, pp):
    """Rank 0 of the first stage: parameter elements under parallelize_module + fully_shard (2-D
    mesh) equal the
    layout theory; bytes per kind follow the precision's table (FSDP bf16_master: fp32 shards are
    the masters)."""
    import torch

    from recompute_lab.model.gpt import build_model

    cfg = cfg_of(LLAMA, n_layer=3, n_kv_head=4, d_ff=96)
    lay = OmegaConf.structured(LayoutConfig(tp=tp, dp_shard=ds, pp=pp))
    stage_cfg = cfg_of(LLAMA, n_layer=L.stage_layers(3, pp)[0], n_kv_head=4, d_ff=96)
    mesh = T.mesh_of({"dp_shard": ds, "tp": tp})
    model = build_model(stage_cfg, "meta", torch.bfloat16)
    if pp > 1:  # the first stage has no final norm nor head
        model.norm_f, model.head = torch.nn.Identity(), None
    T.parallelize(model, mesh["tp"], sp=True)
    if ds > 1:
        T.shard_stage(model, mesh["dp_shard"])
    got = T.local_param_numel(model)["numel"]
    pred = L.model_state_per_rank(cfg, lay, "bf16_master", stage=0)
    assert got == pred["params_per_rank"]
    per = pred["per_param"]
    if ds > 1:
        assert per == {"params": 4 * got, "grads": 4 * got, "master": 0, "optimizer": 8 * got}
    else:
        assert per == {"params": 2 * got, "grads": 2 * got, "master": 4 * got, "optimizer": 8 * got}


@pytest.mark.parametrize("p", [2, 4, 8])
def test_pipeline_in_flight_pytorch_schedules_equal_closed_forms(p):
    for m in (p, 2 * p, 3 * p):
        assert L.schedule_in_flight("1f1b", p, m) == [
            p - r for r in range(p)
        ]  # stage 0 keeps p micro-batches
    for v in (2, 3):
        for m in (p, 2 * p, 4 * p):
            counted = L.schedule_in_flight("interleaved", p, m, v)
            assert counted == [L.in_flight_chunks("interleaved", p, m, r, v) for r in range(p)], (
                v,
                m,
            )
            if m >= 2 * p:  # enough micro-batches that the warm-up is not capped by m x v
                assert counted[0] / (p * v) == pytest.approx(L.interleaved_first_stage_factor(p, v))
            else:  # m = p: every chunk's forward precedes the first backward: L layers, factor 1
                assert counted[0] == min(p * v, 2 * (p - 1) + (v - 1) * p + 1)


def test_stage_layers_and_bytes_weighted_schedule():
    assert L.stage_layers(10, 4) == [3, 3, 2, 2]
    assert L.stage_layers(8, 2, 2) == [2, 2, 2, 2]
    # bytes per stage: the first stage's embeddings count once per micro-batch in flight
    assert L.schedule_in_flight("1f1b", 2, 4, stage_bytes=[10, 1]) == [20, 1]


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(tp=3), r"valid tp: \[1, 2, 4, 8\]"),
        (dict(cp=3), "must divide the sequence length"),
        (dict(tp=8, cp=8), "tp must divide seq_len / cp"),
        (dict(pp=4, pp_schedule="interleaved", pp_virtual=3), "valid pp_virtual"),
        (dict(pp=2, pp_schedule="interleaved", pp_virtual=2, microbatches=3), "multiple of pp=2"),
        (dict(pp=2, pp_virtual=2), "needs pp_schedule=interleaved"),
        (dict(pp=99), "exceeds model.n_layer"),
        (dict(dp_shard=0), "positive integer"),
    ],
)
def test_layout_errors_name_valid_choices(over, match):
    lay = OmegaConf.structured(LayoutConfig(**over))
    with pytest.raises(ConfigError, match=match):
        L.validate_layout(lay, cfg_of(LLAMA, n_layer=8), 32)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_learned_positions_under_tp_and_sp(world, strategy):
    """Korthikanti's own setting (GPT-3: learned positions) with SP: the position table is split
    by rows like the token table, and each rank adds its s / t positions to its sequence slice.
    The meta count of rank 0 equals the per-rank theory module by module, SP saves less than tp
    alone, and the table's rows shard."""
    cfg = cfg_of(KORTHIKANTI, positions="learned")
    totals = {}
    for tp in TPS:
        for sp in (False, True):
            L.validate_layout(OmegaConf.structured(LayoutConfig(tp=tp, sp=sp)), cfg, S)
            measured, pred = measure(cfg, tp, sp, strategy)
            assert measured["total"] == pred["total"], (tp, sp)
            assert measured["by_module"] == {k: v for k, v in pred["by_module"].items() if v}
            totals[tp, sp] = measured["total"]
    # sequence parallelism splits the residual stream's saved tensors (norms, dropouts): less per
    # rank than tp alone
    assert all(totals[tp, True] < totals[tp, False] for tp in TPS if tp > 1)
    model, _ = T.build_parallel(cfg, 4, True, {"name": "none"})
    assert model.pos_emb.weight.to_local().shape == (32 // 4, 64)
    assert L.tp_local_shape(ParamTensor("pos_emb.weight", (32, 64)), 4) == (8, 64)
    with pytest.raises(ConfigError, match="max_seq_len=30"):
        L.validate_layout(
            OmegaConf.structured(LayoutConfig(tp=4, sp=True)), cfg_of(KORTHIKANTI,
            positions="learned", max_seq_len=30), 28
        )


def test_estimate_cli_per_gpu_section(tmp_path):
    """python -m recompute_lab.estimate with estimate.layout.*: one micro-batch measured on meta
    equals the per-rank
    theory, each pipeline rank's model state is the layout's, and a bad degree exits 2 naming the
    valid ones."""
    import json

    from conftest import run_cli

    out = tmp_path / "e.json"
    args = [
        "model=tiny",
        "model.positions=rope",
        "model.n_layer=4",
        "data.batch_size=2",
        "data.seq_len=32",
        "precision=bf16_master",
        "+strategy=full",
        "estimate.layout.tp=2",
        "estimate.layout.pp=2",
        "estimate.layout.dp_shard=2",
        "estimate.layout.gpu=a100_40gb",
        f"estimate.out={out}",
    ]
    proc = run_cli(args, cwd=tmp_path, module="recompute_lab.estimate")
    assert proc.returncode == 0, proc.stderr
    assert "per GPU under tp=2 (sp=True) pp=2" in proc.stdout
    assert "card a100_40gb: 39.38 GiB" in proc.stdout and "fits, margin" in proc.stdout
    res = json.loads(out.read_text())["series"][0]["per_gpu"]
    mb = res["micro_batch"]
    assert {k: mb["measured"][k] for k in ("layer", "first", "last")} == {
        k: mb["predicted"][k] for k in ("layer", "first", "last")
    }
    cfg = OmegaConf.create(json.loads(out.read_text())["config"]["model"])
    lay = OmegaConf.structured(LayoutConfig(tp=2, pp=2, dp_shard=2))
    assert [r["model_state"] for r in res["stages"]] == [
        L.model_state_per_rank(cfg, lay, "bf16_master", stage=r)["total"] for r in range(2)
    ]
    assert (
        res["gpus"] == 8
        and res["plan"]["fits"]
        and [r["in_flight"] for r in res["stages"]] == [2, 1]
    )
    bad = run_cli(
        args[:-5] + ["estimate.layout.tp=3"], cwd=tmp_path, module="recompute_lab.estimate"
    )
    assert (
        bad.returncode == 2
        and "valid tp: [1, 2, 4]" in bad.stderr + bad.stdout
        and "Traceback" not in bad.stderr
    )


def test_readme_pp_schedule_values_compose():
    """The schedule names docs/layouts.md gives for estimate.layout.pp_schedule are the ones the
    schema takes
    (it had
    '1f1b', the enum's value, which Hydra refuses: overrides name the member)."""
    import re

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from docs_text import page
    from recompute_lab.config import CONF_DIR

    values = re.search(r"`pp_schedule=([\w|]+)`", page("layouts")).group(1).split("|")
    assert len(values) == 2
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for v in values:
            cfg = compose(config_name="estimate", overrides=[f"estimate.layout.pp_schedule={v}"])
            assert str(cfg.estimate.layout.pp_schedule) in ("1f1b", "interleaved")
    GlobalHydra.instance().clear()

