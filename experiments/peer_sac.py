"""Our budget planner beside PyTorch's SACEstimator + MILP (sac_milp), planned and then measured.

    python experiments/peer_sac.py      # writes experiments/figures/peer_sac.md (needs pulp, pwlf)
    python experiments/peer_sac.py --time   # also times both plans paired (printed only)

For each shape (our GPT `tiny` and `small`, fp32, CPU) and each activation budget (a fraction of
what `none` is measured to save):

- theirs: torch.distributed._tools, driven as PyTorch's own tests drive it
  (test/distributed/_tools/test_sac_ilp.py): MemTracker over two forward + backward steps,
  RuntimeEstimator and SACEstimator (roofline mode) over one, all under FakeTensorMode; then
  ilp_utils.aggregate_stats / parse_module_info and sac_ilp.sac_milp give the modules to
  checkpoint, the fraction of each one's activations to discard, a predicted recompute time and
  a predicted peak. The plan is applied to a real model as sac_ilp's per-module solver says:
  get_optimal_checkpointing_policy_per_module(stats, 1 - discard) picks the ops to save, and a
  torch.utils.checkpoint region (non-reentrant) with create_selective_checkpoint_contexts saves
  them, op by op in SACEstimator's order (the op names are checked as they run).
- ours: `+strategy=budget strategy.budget_bytes=B` (options probed once per shape, solved per
  budget, as experiments/bench_budget.py does): its plan, predicted activation bytes and
  predicted recompute FLOPs.
- both plans are then MEASURED on the real CPU model the same way: activation bytes by
  recompute_lab.measure.memory's resident count (SAC's cache included; budget.measure_step), and
  recompute FLOPs as backward FLOPs (FlopCounterMode) minus `none`'s. With --time, one forward +
  backward of each plan is also timed against the other (recompute_lab.measure.timing.run_paired,
  ABBA rounds); those ratios are printed, not committed: on a shared CPU they do not repeat.

CPU workarounds, each the smallest we found (also in the table's header):
- sac_milp takes a PEAK budget in GiB (parameters + gradients + activations + activation
  gradients), not an activation budget. Theirs is given its own predicted `none` peak less
  (1 - fraction) x its own count of `none`'s activations (the root module's post-forward ACT);
  whether it met the activation budget is then judged on the measured bytes, as ours is.
- RuntimeEstimator's roofline (used by SACEstimator and the RuntimeEstimator pass) reads its peak
  FLOP/s and DRAM bandwidth from the CUDA device and refuses to run without one. They are given
  this CPU's calibrated fp32 matmul rate and copy bandwidth
  (experiments/figures/cpu_time_calibration.json, tiny b8 s128) by patching its two lookups and
  its CUDA check (as experiments/peer_runtime.py does): the plan is then priced for the CPU it
  runs on. Its "recompute ms" are that roofline's, not a measurement.
- SACEstimator's piecewise-linear fit (pwlf) starts from numpy's global random state: it is
  seeded (0) before the fit so that the plan, and the committed table, are reproducible.

Layer: experiments.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "figures" / "peer_sac.md"
CALIBRATION = HERE / "figures" / "cpu_time_calibration.json"
CALIBRATION_SHAPE = "tiny b8 s128 d64 ff256 h4 fp32"
CONF = str(ROOT / "conf")
SHAPES = [("tiny", 4, 64), ("tiny", 8, 128), ("small", 2, 128)]
FRACTIONS = (0.3, 0.5, 0.7)
GIB = 2**30
SIDES = ("sac_milp", "ours")


def cpu_rates() -> dict:
    """This CPU's fp32 matmul FLOP/s and copy bytes/s, as calibrated and committed."""
    cal = json.loads(CALIBRATION.read_text())["shapes"][CALIBRATION_SHAPE]
    return {"flops": cal["matmul_flops_per_s"], "bytes_per_s": cal["copy_bytes_per_s"]}


@contextlib.contextmanager
def cpu_roofline(rates: dict):
    """RuntimeEstimator's roofline with ``rates`` in place of a CUDA device's (any dtype)."""
    import torch.utils._runtime_estimation as RE

    with (
        mock.patch.object(RE, "get_device_tflops", lambda dtype: rates["flops"] / 1e12),
        mock.patch.object(RE, "get_gpu_dram_gbps", lambda: rates["bytes_per_s"] / 1e9),
        mock.patch("torch.cuda.is_available", lambda: True),
    ):
        yield


def compose_cfg(model: str, b: int, s: int, overrides=()):
    """The run config of ``model`` at (b, s), its position table grown to s where shorter."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    def once(extra):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            return compose(
                config_name="config",
                overrides=[
                    f"model={model}",
                    f"data.seq_len={s}",
                    f"data.batch_size={b}",
                    *extra,
                    *overrides,
                ],
            )

    cfg = once([])
    return cfg if cfg.model.max_seq_len >= s else once([f"model.max_seq_len={s}"])


def fresh_model(cfg):
    from recompute_lab.model.gpt import build_model

    torch.manual_seed(0)
    return build_model(cfg.model, "cpu", torch.float32).train()


def _loss(out):
    return out if torch.is_tensor(out) else out[1]


# --- theirs: statistics under FakeTensorMode, then the MILP ---


def their_stats(cfg, b: int, s: int, rates: dict):
    """(parse_module_info's graph, SACEstimator's per-module SACStats) for one shape."""
    import numpy as np
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.ilp_utils import aggregate_stats, parse_module_info
    from torch.distributed._tools.mem_tracker import MemTracker, _ModState
    from torch.distributed._tools.runtime_estimator import RuntimeEstimator
    from torch.distributed._tools.sac_estimator import SACEstimator

    mode = "operator-level-cost-model"
    with cpu_roofline(rates), FakeTensorMode():
        model = fresh_model(cfg)
        idx = torch.randint(0, cfg.model.vocab_size, (b, s))

        def step() -> None:
            _loss(model(idx, idx)).backward()
            model.zero_grad(set_to_none=False)

        mem = MemTracker()
        mem.track_external(model)
        with mem:
            for i in range(2):  # the first step creates the gradients; stats from the second
                step()
                if i == 0:
                    mem.reset_mod_stats()
            last = mem.get_tracker_snapshot("current")
        # as PyTorch's test does: ModTracker skips the post-backward hook of modules whose inputs
        # need no gradient (the root: token ids), so they get the step's last snapshot
        for stats in mem.memory_tracking.values():
            if _ModState.POST_BW not in stats.snapshots:
                stats.snapshots[_ModState.POST_BW] = [copy.deepcopy(last)]
        runtime = RuntimeEstimator()
        with runtime(mode):
            step()
        sac = SACEstimator()
        with sac(mode):
            out = _loss(model(idx, idx))
        out.backward()
        np.random.seed(0)  # pwlf's fit draws from numpy's global state
        info = aggregate_stats(model, mem, runtime, sac, torch.device("cpu"))
    return parse_module_info(info), sac.sac_mod_stats


def their_none(graph) -> dict:
    """Their `none`: predicted peak (bytes) and activation bytes (the root's post-forward ACT)."""
    from torch.distributed._tools.ilp_utils import get_peak_memory_runtime_baseline

    peak, compute_ms = get_peak_memory_runtime_baseline(graph)
    return {"peak": peak, "act": graph.nodes[0]["act_total"], "compute_ms": compute_ms}


def their_plan(graph, fraction: float) -> dict:
    """sac_milp for a peak budget that asks it to discard (1 - fraction) of its `none`
    activations; predicted activation bytes are its `none` count less what it discards."""
    from torch.distributed._tools.sac_ilp import sac_milp

    base = their_none(graph)
    budget = base["peak"] - (1 - fraction) * base["act"]
    g = copy.deepcopy(graph)  # sac_milp may overwrite a node's sac_memory
    decisions, recompute_ms, peak = sac_milp(g, memory_budget=budget / GIB)
    discarded = 0.0
    for fqn, r in decisions.items():
        node = g.name2node[fqn]
        acm, ia = node["sac_memory"], node["act_fw_per_module"]
        discarded += acm * r - (acm - ia)
    return {
        "decisions": decisions,
        "feasible": peak != -1,
        "predicted_bytes": round(base["act"] - discarded) if peak != -1 else None,
        "predicted_recompute_ms": recompute_ms,
        "predicted_peak": peak,
        "peak_budget": round(budget),
    }


def _policy(decisions: list[int], names: list[str]):
    """A SAC policy that saves op i (in SACEstimator's order, its skipped ops left out) when
    ``decisions[i]`` is 1; forward and recompute each walk the list from the start."""
    from torch.distributed._tools.sac_estimator import OPS_TO_ALWAYS_SKIP
    from torch.utils.checkpoint import CheckpointPolicy

    seen = {False: 0, True: 0}

    def policy(ctx, op, *args, **kwargs):
        if op in OPS_TO_ALWAYS_SKIP:
            return CheckpointPolicy.PREFER_RECOMPUTE
        i = seen[ctx.is_recompute]
        seen[ctx.is_recompute] += 1
        if i >= len(names) or op._overloadpacket.__name__ != names[i]:
            raise RuntimeError(f"op {i} is {op}, SACEstimator saw {names[i : i + 1]}")
        return CheckpointPolicy.MUST_SAVE if decisions[i] else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_theirs(model, decisions: dict, sac_stats: dict) -> None:
    """Checkpoint each module sac_milp chose, saving the ops its per-module MILP keeps."""
    from torch.distributed._tools.sac_ilp import get_optimal_checkpointing_policy_per_module
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    from recompute_lab.strategies.wrap import checkpoint_module

    for fqn, discard in decisions.items():
        stats = sac_stats[fqn]
        keep = get_optimal_checkpointing_policy_per_module(stats, memory_budget=1 - discard)
        if not keep:
            raise RuntimeError(f"the per-module MILP found no policy for {fqn}")
        rel = fqn.partition(".")[2]  # ModTracker names the root by its class
        module = model.get_submodule(rel) if rel else model

        def context(keep=keep, names=stats.func_names):
            return create_selective_checkpoint_contexts(_policy(keep, names))

        checkpoint_module(module, context_fn=context)


# --- ours ---


def our_plan(cfg, probed, budget_bytes: int):
    """(model with our plan applied, Plan) for an activation budget, or (None, None)."""
    from recompute_lab.config import ConfigError
    from recompute_lab.config.spec import RunSpec
    from recompute_lab.strategies import budget as B
    from recompute_lab.strategies import parse_options

    model = fresh_model(cfg)
    try:
        plan = B.solve(model, parse_options(cfg.strategy), RunSpec.of(cfg).shape(), probed)
    except ConfigError:
        return None, None
    return model, plan


# --- measurement ---


def measure(model, b: int, s: int, none=None) -> dict:
    """Counted, never predicted: resident activation bytes and recompute FLOPs (backward FLOPs
    beyond `none`'s)."""
    from recompute_lab.strategies import budget as B

    torch.manual_seed(0)
    m = B.measure_step(model, b, s)
    model.zero_grad(set_to_none=True)
    base = none or m
    return {
        "bytes": m.activation_bytes,
        "backward_flops": m.backward_flops,
        "recompute_flops": m.backward_flops - base["backward_flops"] if none else 0,
    }


def _their_label(plan: dict) -> str:
    """Modules and discard fractions, then sac_milp's predicted peak against its peak budget."""
    chosen = ", ".join(f"{k.partition('.')[2] or k} {r:.2f}" for k, r in plan["decisions"].items())
    return (
        f"{chosen or 'nothing checkpointed'}; predicted peak {plan['predicted_peak']} B of "
        f"{plan['peak_budget']} B"
    )


def _our_label(plan) -> str:
    chosen = plan.details["chosen"]
    return ", ".join(f"{chosen.count(c)}x {c}" for c in dict.fromkeys(chosen))


def shape_rows(
    model_name: str, b: int, s: int, fractions=FRACTIONS, rates=None, timed: bool = False
) -> list[dict]:
    """Both sides' rows for one shape, every budget; with ``timed``, the sac_milp row also holds
    :func:`paired_time` of the two plans (printed, never written to the table)."""
    from recompute_lab.config.spec import RunSpec
    from recompute_lab.strategies import budget as B

    rates = rates or cpu_rates()
    cfg = compose_cfg(model_name, b, s)
    none = measure(fresh_model(cfg), b, s)
    graph, sac_stats = their_stats(cfg, b, s, rates)
    theirs_none = their_none(graph)
    bcfg = compose_cfg(model_name, b, s, ["+strategy=budget"])
    probed = B.probe_model(fresh_model(bcfg), RunSpec.of(bcfg).shape())
    case = f"{model_name} b{b} s{s}"
    out = []
    for f in fractions:
        budget = int(f * none["bytes"])
        common = {"case": case, "fraction": f, "budget": budget, "none_bytes": none["bytes"]}
        plan = their_plan(graph, f)
        row = {
            **common,
            "side": "sac_milp",
            "plan": "infeasible",
            "predicted_bytes": None,
            "measured_bytes": None,
            "predicted_recompute": None,
            "measured_recompute": None,
        }
        theirs = None
        if plan["feasible"]:
            model = theirs = fresh_model(cfg)
            apply_theirs(model, plan["decisions"], sac_stats)
            got = measure(model, b, s, none)
            row.update(
                plan=_their_label(plan),
                predicted_bytes=plan["predicted_bytes"],
                measured_bytes=got["bytes"],
                predicted_recompute=f"{plan['predicted_recompute_ms']:.2f} ms",
                measured_recompute=got["recompute_flops"],
            )
        row["their_none_bytes"] = theirs_none["act"]
        out.append(row)
        ocfg = compose_cfg(
            model_name, b, s, ["+strategy=budget", f"strategy.budget_bytes={budget}"]
        )
        model, oplan = our_plan(ocfg, probed, budget)
        row = {
            **common,
            "side": "ours",
            "plan": "infeasible",
            "predicted_bytes": None,
            "measured_bytes": None,
            "predicted_recompute": None,
            "measured_recompute": None,
        }
        if oplan is not None:
            got = measure(model, b, s, none)
            row.update(
                plan=_our_label(oplan),
                predicted_bytes=oplan.predicted_activation_bytes,
                measured_bytes=got["bytes"],
                predicted_recompute=f"{oplan.details['predicted_recompute_flops']} FLOPs",
                measured_recompute=got["recompute_flops"],
            )
            if timed and theirs is not None:
                out[-1]["paired"] = paired_time(theirs, model, b, s, cfg.model.vocab_size)
        out.append(row)
    return out


def paired_time(a, b_model, b: int, s: int, vocab: int):
    """One forward + backward of ``a`` against ``b_model``, interleaved (ABBA) rounds on the same
    batch: recompute_lab.measure.timing.run_paired's ratio a / b with its 95% interval."""
    from recompute_lab.measure.timing import run_paired

    idx = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(0))

    def step(model):
        def one(i: int) -> float:
            t0 = time.perf_counter()
            _loss(model(idx, idx)).backward()
            model.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

        return one

    return run_paired(step(a), step(b_model), min_rounds=10, max_rounds=30, max_seconds=20)


def rows(shapes=SHAPES, fractions=FRACTIONS, timed: bool = False) -> list[dict]:
    rates = cpu_rates()
    return [r for m, b, s in shapes for r in shape_rows(m, b, s, fractions, rates, timed)]


def timing_lines(data: list[dict]) -> list[str]:
    """The paired step times, for the console: machine-dependent, so never in the table."""
    lines = ["paired forward + backward, sac_milp's plan / ours (median ratio, 95% interval):"]
    for r in data:
        if "paired" in r:
            p = r["paired"]
            ci = "no interval" if p.ci95_low is None else f"{p.ci95_low:.3f}-{p.ci95_high:.3f}"
            ratio = "-" if p.ratio is None else f"{p.ratio:.3f}"
            lines.append(
                f"  {r['case']} at {r['fraction']:.0%}: {ratio} ({ci}), {p.rounds} rounds, "
                f"stopped: {p.stopped}"
            )
    return lines


# --- the table ---

COLUMNS = (
    "case",
    "budget",
    "side",
    "plan",
    "predicted act. B",
    "measured act. B",
    "met budget",
    "predicted recompute",
    "measured recompute FLOPs",
)


def met(row: dict) -> str:
    """Whether the measured activation bytes are within the budget ('-' without a plan)."""
    if row["measured_bytes"] is None:
        return "-"
    return "yes" if row["measured_bytes"] <= row["budget"] else "no"


def _cell(v) -> str:
    return "-" if v is None else str(v)


def winner(pair: list[dict]) -> str:
    """The side that met the budget with fewer measured recompute FLOPs (or 'tie' / 'neither')."""
    ok = [r for r in pair if met(r) == "yes"]
    if not ok:
        return "neither"
    if len(ok) == 1:
        return ok[0]["side"]
    a, b = ok
    if a["measured_recompute"] == b["measured_recompute"]:
        return "tie"
    return min(ok, key=lambda r: r["measured_recompute"])["side"]


def _pairs(data: list[dict]) -> list[list[dict]]:
    keys = list(dict.fromkeys((r["case"], r["fraction"]) for r in data))
    return [[r for r in data if (r["case"], r["fraction"]) == k] for k in keys]


def _error(r: dict) -> float:
    return (r["predicted_bytes"] - r["measured_bytes"]) / r["measured_bytes"]


def summary(data: list[dict]) -> list[str]:
    """'Where each wins', in words computed from the rows."""
    pairs = _pairs(data)
    n = len(pairs)
    lines = []
    for side in SIDES:
        mine = [r for r in data if r["side"] == side]
        planned = [r for r in mine if r["measured_bytes"] is not None]
        errs = sorted(abs(_error(r)) for r in planned)
        over = [r for r in planned if r["measured_bytes"] > r["predicted_bytes"]]
        worst = f"{max(errs):.1%}" if errs else "-"
        lines.append(
            f"- {side}: a plan for {len(planned)} of {n} shape x budget cases, the measured "
            f"activation bytes within the budget in {sum(met(r) == 'yes' for r in mine)}; its "
            f"predicted activation bytes were off by {worst} at worst (|predicted - measured| / "
            f"measured), under the measurement in {len(over)} of {len(planned)}."
        )
    wins = [winner(p) for p in pairs]
    both = [p for p in pairs if all(met(r) == "yes" for r in p)]
    by_side = [{r["side"]: r["measured_recompute"] for r in p} for p in both]
    ratios = sorted(s["sac_milp"] / s["ours"] for s in by_side if s["ours"])
    lines.append(
        f"- Fewer measured recompute FLOPs within the budget: sac_milp in "
        f"{wins.count('sac_milp')} cases, ours in {wins.count('ours')}, tie in "
        f"{wins.count('tie')}, neither met it in {wins.count('neither')} (a side that missed the "
        "budget does not win)."
    )
    if ratios:
        lines.append(
            f"- Where both met the budget ({len(both)} cases), sac_milp's recompute FLOPs were "
            f"{ratios[0]:.2f}x to {ratios[-1]:.2f}x the budget planner's."
        )
    for p in pairs:
        w = winner(p)
        lines.append(f"  - {p[0]['case']} at {p[0]['fraction']:.0%}: {w}")
    return lines


def table(data: list[dict]) -> str:
    cases = list(
        dict.fromkeys(
            (r["case"], r["none_bytes"], r["their_none_bytes"])
            for r in data
            if r["side"] == "sac_milp"
        )
    )
    rates = cpu_rates()
    lines = [
        "# recompute_lab's budget planner beside PyTorch's SACEstimator + sac_milp",
        "",
        "Generated by `python experiments/peer_sac.py` (torch "
        f"{torch.__version__.split('+')[0]}, fp32, CPU). Budget: a fraction of the activation "
        "bytes `none` is measured to save, in bytes. sac_milp plans under a PEAK budget (GiB: "
        "parameters, gradients, activations, activation gradients): it gets its own predicted "
        "`none` peak less (1 - fraction) x its own count of `none`'s activations. Its roofline "
        f"runs at this CPU's calibrated rates ({rates['flops'] / 1e9:.1f} GFLOP/s matmul, "
        f"{rates['bytes_per_s'] / 1e9:.1f} GB/s copy; cpu_time_calibration.json) patched in "
        "for the CUDA device it reads; its pwlf fit is seeded. Plans: sac_milp's modules with "
        "the fraction of their activations to discard (each applied as a SAC region saving the "
        "ops its per-module MILP keeps), and its predicted peak against the peak budget it was "
        "given; ours (`+strategy=budget strategy.budget_bytes=...`): "
        "blocks per option. Measured: resident activation "
        "bytes (saved-tensor count, SAC cache included) and backward FLOPs beyond `none`'s "
        "(FlopCounterMode) on the real model, one step. infeasible: the solver returned no plan "
        "(sac_milp: no solution under its peak budget; ours: a ConfigError).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in data:
        lines.append(
            f"| {r['case']} | {r['fraction']:.0%}: {r['budget']} | {r['side']} | {r['plan']} | "
            f"{_cell(r['predicted_bytes'])} | {_cell(r['measured_bytes'])} | {met(r)} | "
            f"{_cell(r['predicted_recompute'])} | {_cell(r['measured_recompute'])} |"
        )
    lines += [
        "",
        "`none` per case, bytes: measured (saved-tensor count) | sac_milp's own count "
        "(MemTracker, root's post-forward ACT)",
        "",
        "| case | none measured B | sac_milp's none B |",
        "|---|---|---|",
        *(f"| {c} | {ours} | {theirs} |" for c, ours, theirs in cases),
        "",
        "## Where each wins (computed from the rows above)",
        "",
        *summary(data),
    ]
    return "\n".join(lines) + "\n"


def parse(text: str) -> list[dict]:
    """The rows of a written table (what table() needs to write it again)."""
    nones = {}
    rows_: list[dict] = []
    for ln in text.splitlines():
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].isdigit():
            nones[cells[0]] = (int(cells[1]), int(cells[2]))
        if len(cells) != len(COLUMNS) or cells[1] == "budget" or cells[0].startswith("---"):
            continue
        frac, budget = cells[1].split(": ")

        def num(c):
            return None if c == "-" else int(c)

        rows_.append(
            {
                "case": cells[0],
                "fraction": float(frac.rstrip("%")) / 100,
                "budget": int(budget),
                "side": cells[2],
                "plan": cells[3],
                "predicted_bytes": num(cells[4]),
                "measured_bytes": num(cells[5]),
                "met": cells[6],
                "predicted_recompute": None if cells[7] == "-" else cells[7],
                "measured_recompute": num(cells[8]),
            }
        )
    for r in rows_:
        r["none_bytes"], r["their_none_bytes"] = nones[r["case"]]
    return rows_


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument(
        "--time",
        action="store_true",
        help="also time both plans paired (printed only: timings on a shared CPU are not "
        "reproducible, the table stays counts)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    data = rows(timed=args.time)
    text = table(data)
    args.out.write_text(text)
    print(text)
    if args.time:
        print("\n".join(timing_lines(data)))
    print(f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
