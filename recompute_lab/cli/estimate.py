"""Predict training memory for models too large for this machine, on the meta device (nothing is
allocated):
``recompute-lab-estimate model=llama3_8b data.seq_len=4096 +strategy=full`` or ``python -m
recompute_lab.estimate ...``; -m sweeps (models, strategies, data.seq_len) write one estimate.json
per job.

    python -m recompute_lab.estimate model=llama3_8b data.seq_len=4096 +strategy=full precision=fp32
    python -m recompute_lab.estimate model=llama3_70b data.batch_size=1
    'estimate.seq_lens=[1024,4096,16384]'
    python -m recompute_lab.estimate -m model=llama3_8b,llama3_70b '+strategy=none,full'
    data.seq_len=4096,8192

A Hydra app over the training config tree (conf/estimate.yaml = conf/config.yaml + the
``estimate.*`` keys of
recompute_lab.config.EstimateConfig: target cuda | cpu, seq_lens, out), with --help, --cfg job and
an output dir
per run (outputs/estimate/DATE/TIME, multirun/estimate/DATE/TIME/N_OVERRIDES) holding estimate.json
and
estimate.log. The model is built on the meta device with the strategy applied, one forward runs
under the
saved-tensor accounting of recompute_lab.measure.memory, and recompute_lab.measure.target_kernels
makes the meta ops save what
the target device's kernels save. The table sets the meta measurement beside
recompute_lab.predict.theory, Korthikanti's
formula and the seed notebook's guess; estimate.json holds the same memory keys as results.json, per
seq_len.

Layer: cli.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from recompute_lab.cli import app
from recompute_lab.config import CONF_DIR, ConfigError, EstimateConfig
from recompute_lab.config.hf import resolve_model
from recompute_lab.config.schema import validate_layout_numbers
from recompute_lab.config.spec import RunSpec, copy_config
from recompute_lab.record.logs import Laps, route_warnings

log = logging.getLogger("recompute_lab.cli.estimate")  # not __name__: "__main__" under python -m

GB = 1e9  # decimal gigabytes, as in the Ultra-Scale Playbook's tables
UNATTRIBUTED = "not attributed to modules"  # the activation row of a total known only as a total


def group_of(module: str) -> str:
    """Table rows: embeddings, blocks, final norm + head, loss (the fp32 logits' log-softmax)."""
    # the per-GPU stages split modules the same way
    from recompute_lab.predict.layout import role_of

    if module == "loss":
        return "loss (fp32 logits)"
    return {"block": "blocks", "first": "embeddings", "last": "norm_f + head"}[role_of(module)]


def grouped(by_module: dict) -> dict:
    out: dict[str, int] = {}
    for k, v in by_module.items():
        out[group_of(k)] = out.get(group_of(k), 0) + v
    return out


def fit_positions(cfg: DictConfig, est: EstimateConfig | DictConfig, notes: list) -> list[int]:
    """The sequence lengths to estimate; the position table grows to the longest (it lives on meta:
    growing it
    costs nothing) with a note, and data.seq_len is the shortest. Changes ``cfg`` (a composed
    config, before its
    RunSpec is made): call it on a copy."""
    seq_lens = [int(s) for s in est.seq_lens] or [int(cfg.data.seq_len)]
    if max(seq_lens) > cfg.model.max_seq_len:
        notes.append(
            f"model.max_seq_len raised from {cfg.model.max_seq_len} to {max(seq_lens)} for the "
            f"series"
        )
        cfg.model.max_seq_len = max(seq_lens)
    cfg.data.seq_len = min(seq_lens)
    return seq_lens


def estimate(cfg: DictConfig, est: EstimateConfig | DictConfig) -> dict:
    """Model state and, per sequence length, activation and peak bytes for ``cfg`` (a composed
    config, not
    changed) on ``est.target``. The config becomes a RunSpec here, once; everything below reads the
    spec."""
    # The prediction layer imports no torch; torch and a meta replica come in only where the theory
    # cannot answer (meta_replica below).
    from recompute_lab.predict import devices, layout
    from recompute_lab.predict import per_gpu
    from recompute_lab.predict import prediction
    from recompute_lab.predict import theory
    from recompute_lab.predict.module_plans import MODULE_STRATEGIES, module_plan

    laps = Laps(log)
    cfg = copy_config(
        cfg
    )  # fit_positions below and HF resolution write into the copy, never the caller's config
    resolve_model(
        cfg
    )  # model=hf: the model fields from the Hugging Face config (a no-op otherwise)
    backend = str((cfg.get("compile") or {}).get("backend", "off"))
    if backend != "off":  # an eager estimate must not pass for a compiled one
        raise ConfigError(
            f"compile.backend={backend}: estimate predicts eager runs on the meta device; what a "
            "compiled step saves is the partitioner's choice, measured by a run "
            "(python -m recompute_lab.train compile=...); use compile=off here"
        )
    if str(cfg.model.arch) == "hf":
        from recompute_lab.model.hf import notes as hf_notes

        notes = hf_notes(cfg.model)
    else:
        notes = []
    seq_lens = fit_positions(cfg, est, notes)
    spec = RunSpec.of(cfg)  # validated, typed, frozen: the one config object from here on
    opts = spec.strategy
    lay = getattr(
        est, "layout", None
    )  # a DictConfig or an EstimateConfig (tests call estimate() directly)
    # The card is checked even without a layout (a nan or negative size must not pass unseen), and
    # a card that nothing will use is said so.
    validate_layout_numbers(lay)
    if devices.device_of(lay) is not None and not layout.is_active(lay):
        notes.append(
            "estimate.layout's device (gpu / device_gib / device_gb) is used by per-GPU layouts "
            "only (some degree above 1): no fit check was made"
        )
    if layout.is_active(lay):
        for s in seq_lens:
            layout.validate_layout(lay, spec.model, s, spec.parallel)
        known = per_gpu.STRATEGIES + per_gpu.MEASURED + ("budget",)
        if opts.name not in known or (
            opts.name == "selective" and list(opts.modules) != ["core_attn"]
        ):
            raise ConfigError(
                f"estimate.layout plans per GPU for strategies {', '.join(known)} "
                f"(selective: modules=[core_attn]), not {opts.name}: layers / sqrt differ block "
                "by block (the per-stage plan's 'n/L full' rows and +strategy=budget choose "
                "recomputed layers per stage)"
            )
        if opts.name == "budget":
            from recompute_lab.strategies.budget.layout import card_of

            card_of(lay, opts)  # a card is needed, one only: refused before any model is built
    one_device = spec.strategy
    if layout.is_active(lay) and opts.name == "budget":
        # the whole model rarely fits one card: the one-device section plans at the activation
        # fraction, the per-GPU section against the card
        one_device = dataclasses.replace(opts, device_memory_gb=None)
        notes.append(
            f"one-device section: +strategy=budget at budget_fraction={opts.budget_fraction} of "
            "none's activations; the per-GPU section plans each stage's peak against the card"
        )
    target = str(est.target)
    par = spec.parallel
    dp = par.dp_size or 1
    # Per rank: DDP replicates model state, FSDP (ZeRO-3) shards it over parallel.dp_size ranks
    # (padded dim-0
    # shards, as FSDP2 keeps them); the peak adds each layout's buffers
    # (recompute_lab.predict.peak). The plan is made for this rank on the target's kernels.
    step = spec.shape(target, str(par.kind), dp)
    autocast = spec.precision.name == "bf16_autocast"
    cross_check = bool(est.cross_check)
    replica: dict = {}

    def meta_replica():
        """(model, plan) on the meta device with the strategy applied, built once when needed."""
        if not replica:
            from recompute_lab.measure.probe import guard_blocks
            from recompute_lab.model.gpt import build_model
            from recompute_lab.model.precision import make_precision
            from recompute_lab.strategies import apply_strategy

            guard_blocks(spec, target)  # train's guard: priced from shapes, before any build
            policy = make_precision(spec.precision)
            model = build_model(spec.model, "meta", policy.param_dtype)
            replica.update(model=model, plan=apply_strategy(model, one_device, step))
            model.train()
            laps(
                f"meta model {spec.model.name} + strategy {replica['plan'].name}",
                f"{model.get_num_params():,} params",
            )
        return replica["model"], replica["plan"]

    # Our own transformer under a module-level strategy, one device, no meta cross-check: the Plan
    # from the options alone (the one strategies.module applies) and the parameter count from the
    # shapes; torch is never imported (bench_cli: the answer in about a second).
    theory_only = (
        str(spec.model.arch) == "gpt"
        and opts.name in MODULE_STRATEGIES
        and not opts.offload
        and not layout.is_active(lay)
        and not cross_check
        and spec.model.n_layer <= prediction.MAX_BLOCKS
        and (spec.precision.name == "bf16_master" or not spec.precision.fp32_grad_accum)
    )
    if theory_only:
        plan = module_plan(one_device, spec.model.n_layer)
        n_params = theory.param_count(spec.model)
        what = f"plan {spec.model.name} + strategy {plan.name} (no model built)"
        laps(what, f"{n_params:,} params")
    else:
        model, plan = meta_replica()
        n_params = model.get_num_params()
    state = prediction.model_state(spec.model, step, n_params)
    if str(par.kind) != "none":
        notes.append(f"model state per rank: parallel={par.kind}, dp_size={dp}")
    if autocast:
        notes.append("autocast has no meta backend: activations below are the theory's only")
    series = []
    for s in seq_lens:
        b = int(spec.data.batch_size)
        st = step.replace(batch=b, seq=s)
        measured, by_module = None, None
        # The one prediction (recompute_lab.predict.prediction): a plan without a closed form (op,
        # regions) is priced from the resident meta count, as the memory guard prices it.
        predicted = prediction.predict(spec, plan, st, n_params)
        if not autocast and (cross_check or predicted.activations.get("source") != "theory"):
            from recompute_lab.measure.memory import meta_saved_tensors

            model, _ = meta_replica()
            counted = meta_saved_tensors(model, b, s, target)
            del counted["output"]
            # resident: what the forward leaves alive (checkpoint frames' tensors and the SAC cache
            # included), by module: the rows add up to it
            measured, by_module = counted["resident_total"], counted["resident_by_module"]
            predicted = prediction.predict(spec, plan, st, n_params, counted_activations=measured)
        pred = predicted.activations
        by_module = by_module if by_module is not None else (pred.get("by_module") or {})
        shown = measured if measured is not None else pred["total"]
        if shown is not None and sum(by_module.values()) != shown:
            # a total without a module breakdown (a budget plan's probed price under autocast)
            by_module = {**by_module, UNATTRIBUTED: shown - sum(by_module.values())}
        peak = predicted.peak
        laps(
            f"s={s} b={b} ({len(series) + 1}/{len(seq_lens)})",
            "activations "
            + (
                "not predicted (" + str(pred.get("reason")) + ")"
                if shown is None
                else f"{shown / GB:.2f} GB {'meta-measured' if measured is not None else 'theory'}"
            ),
        )
        layers = spec.model.n_layer
        if layout.is_active(
            lay
        ):  # per GPU: one micro-batch measured with PyTorch's TP plan, every stage's bytes
            from recompute_lab.measure.tensor_parallel import measure_micro_batch

            planned = None
            if opts.name == "budget":  # every planner option priced per rank, solved per stage
                from recompute_lab.strategies.budget.layout import budget_layout

                planned = budget_layout(
                    spec.model,
                    lay,
                    opts,
                    b,
                    s,
                    spec.precision.name,
                    target,
                    measure_micro_batch,
                    st.fp32_grad_accum,
                )
            series_layout = per_gpu.layout_estimate(
                spec.model,
                lay,
                opts.name,
                b,
                s,
                spec.precision.name,
                target,
                measure=measure_micro_batch,
                fp32_grad_accum=st.fp32_grad_accum,
                options=opts,
                planned=planned,
            )
            laps(
                f"s={s} per GPU under the layout",
                f"{max(r['total'] for r in series_layout['stages']) / 2**30:.2f} GiB",
            )
        series.append(
            {
                "seq_len": s,
                "batch_size": b,
                "activation_bytes": {
                    "predicted": pred["total"],
                    "measured": measured,
                    "source": "meta",
                    "by_module": by_module,
                    "by_group": grouped(by_module),
                    "prediction_note": pred["reason"],
                    "korthikanti": layers
                    * theory.korthikanti_layer_bytes(s, b, spec.model.d_model, spec.model.n_head),
                    "naive": layers * theory.naive_layer_bytes(s, b, spec.model.d_model),
                },
                "logits_bytes": pred.get("logits"),
                "peak_bytes": {
                    "predicted": None if peak is None else peak["total"],
                    "measured": None,
                    "source": "theory",
                    "phases": None if peak is None else peak["phases"],
                    "phase": None if peak is None else peak["phase"],
                },
                **({"per_gpu": series_layout} if layout.is_active(lay) else {}),
            }
        )
    first = series[0]
    return {
        "config": spec.to_dict(),
        "target": target,
        "assumptions": theory.kernel_assumptions(target),
        "notes": notes,
        "strategy": plan.to_dict(),
        "model": {"name": spec.model.name, "params": n_params, "n_layer": spec.model.n_layer},
        "memory": {
            "model_state_bytes": {
                "predicted": state["total"],
                "measured": None,
                "per_param": state["per_param"],
                "bytes_per_param": state["bytes_per_param"],
            },
            "activation_bytes": first["activation_bytes"],
            "peak_bytes": first["peak_bytes"],
        },
        "series": series,
    }


def format_table(res: dict) -> str:
    """Model state by kind, activations by group, logits and totals, in GB; one column per
    seq_len."""
    series, ms = res["series"], res["memory"]["model_state_bytes"]
    n_layer = res["model"]["n_layer"]
    w = 14

    def row(label, values):
        return f"{label:<34}" + "".join(
            f"{'-' if v is None else f'{v / GB:.2f}':>{w}}" for v in values
        )

    lines = [
        f"{res['model']['name']}: {res['model']['params']:,} params, strategy "
        f"{res['strategy']['name']}, "
        f"target {res['target']}, GB = 1e9 bytes",
        f"{'':<34}"
        + "".join(
            f"{'s=' + str(x['seq_len']) + ' b=' + str(x['batch_size']):>{w}}" for x in series
        ),
    ]
    lines.append(f"model state ({ms['bytes_per_param']} B/param)")
    for kind, v in ms["per_param"].items():
        lines.append(row(f"  {kind}", [v] * len(series)))
    lines.append(row("  total", [ms["predicted"]] * len(series)))
    meta = series[0]["activation_bytes"]["measured"] is not None
    autocast = any("no meta backend" in n for n in res["notes"])
    source = (
        "meta-measured"
        if meta
        else "theory: no meta autocast"
        if autocast
        else "theory; estimate.cross_check=true adds the meta count"
    )
    lines.append(f"activations (saved for backward, {source})")
    groups = sorted({g for x in series for g in x["activation_bytes"]["by_group"]})
    for g in groups:
        label = f"  {g} (x{n_layer})" if g == "blocks" else f"  {g}"
        lines.append(row(label, [x["activation_bytes"]["by_group"].get(g, 0) for x in series]))
    lines.append(
        row("  total (meta-measured)", [x["activation_bytes"]["measured"] for x in series])
    )
    lines.append(row("  total (theory)", [x["activation_bytes"]["predicted"] for x in series]))
    lines.append(row("  of which logits (fp32, 4sbv)", [x["logits_bytes"] for x in series]))
    lines.append(
        row(
            "  Korthikanti sbh(34+5as/h) x L",
            [x["activation_bytes"]["korthikanti"] for x in series],
        )
    )
    lines.append(
        row("  naive 2*2*h per token x L", [x["activation_bytes"]["naive"] for x in series])
    )
    one = " (one device, no layout)" if any("per_gpu" in x for x in series) else ""
    lines.append(row(f"peak (theory){one}", [x["peak_bytes"]["predicted"] for x in series]))
    lines.append(
        f"{'  at phase':<34}"
        + "".join(f"{str(x['peak_bytes'].get('phase') or '-'):>{w}}" for x in series)
    )
    budget = res["strategy"].get("budget") or {}
    if "binding_phase" in budget:
        fit, reserve = res["strategy"].get("device_fit") or {}, budget["reserve"]
        lines.append(
            f"budget plan (s={series[0]['seq_len']}): device {budget['device_bytes'] / GB:.2f} GB "
            f"- reserve {reserve['total'] / GB:.2f} (context {reserve['cuda_context'] / GB:.2f}, "
            f"NCCL {reserve['communication'] / GB:.2f}, fragmentation "
            f"{reserve['fragmentation'] / GB:.2f}) = step peak up to "
            f"{budget['peak_limit'] / GB:.2f} GB; the {budget['binding_phase']} phase binds, "
            f"leaving {budget['bytes'] / GB:.2f} GB for activations"
        )
        if fit:
            lines.append(
                f"  the plan's predicted peak {fit['peak_bytes'] / GB:.2f} GB + its reserve "
                f"{fit['reserve']['total'] / GB:.2f} GB: margin {fit['margin_bytes'] / GB:.2f} GB"
            )
    for x in series:
        if "per_gpu" in x:
            from recompute_lab.predict.per_gpu import format_layout

            lines += [f"s={x['seq_len']}:"] + format_layout(x["per_gpu"])
    lines += [f"assumption: {a}" for a in res["assumptions"]] + [f"note: {n}" for n in res["notes"]]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="estimate")
def main(cfg: DictConfig) -> float | None:
    """One estimate per job: the table on stdout, estimate.json (estimate.out) in the job's output
    dir."""
    route_warnings()
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    t0 = time.perf_counter()
    try:
        res = estimate(cfg, cfg.estimate)
    except ConfigError as e:
        log.error("estimate: invalid configuration: %s", e)
        if multirun:
            return None  # the sweep's other jobs go on
        sys.exit(2)
    from recompute_lab.record.results import write_json_atomic

    res["elapsed_s"] = time.perf_counter() - t0
    print(format_table(res))
    out = Path(hc.runtime.output_dir) / cfg.estimate.out  # an absolute estimate.out stays as it is
    write_json_atomic(out, res)
    log.info("wrote %s (%.1f s)", out, res["elapsed_s"])
    return res["memory"]["peak_bytes"]["predicted"]


def cli() -> None:
    """``python -m recompute_lab.estimate`` (and the ``recompute-lab-estimate`` console script)."""
    app.launch(main, "estimate", root_keys=("estimate",))


if __name__ == "__main__":
    cli()
