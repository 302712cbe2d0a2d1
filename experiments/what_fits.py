"""What fits: Llama-3 70B and 405B on H100 80GB and H200 cards at 8k / 32k / 128k tokens, per
layout and strategy, after the card's reserve.

For each model, context length, device size and recomputation strategy (none, selective, full on
every stage),
the smallest layout (fewest GPUs per model replica = tp x pp x cp, then the lowest per-GPU peak)
whose busiest
pipeline rank's step peak fits the card (recompute_lab.predict.devices: the total torch reports,
less
the default reserve for the CUDA context, NCCL buffers and fragmentation), with that rank's bytes
(recompute_lab.predict.per_gpu), the margin left, and what the
per-stage planner
chooses on that layout when the strategy is full: per stage, the fewest layers recomputed fully (the
rest under
none or selective) that fit, since later 1F1B stages keep fewer micro-batches in flight.
Fixed: bf16 with fp32 master weights and AdamW, micro-batch 1, FSDP over dp_shard = 8 GPUs, sequence
parallelism on whenever tp > 1, 1F1B with m = pp, CUDA kernels (flash SDPA). Computed in seconds on
CPU.

    python experiments/what_fits.py                       # writes
                                                          experiments/figures/what_fits.{md,png}
    python experiments/what_fits.py --out /tmp/fits       # elsewhere (tests/unit/test_what_fits.py
                                                          compares)
    python experiments/what_fits.py 'models=[llama3_8b]' 'seq_lens=[8192,32768]' 'cards=[a100_80gb]'
                                                          # a grid of your own (outputs/what_fits)
"""

from __future__ import annotations

import argparse
import functools
import itertools
import time
from pathlib import Path

from omegaconf import OmegaConf

from recompute_lab.predict import devices, per_gpu
from recompute_lab.config import CONF_DIR, LayoutConfig, ModelConfig
from recompute_lab.config.spec import as_model_config

MODELS = ("llama3_70b", "llama3_405b")
SEQS = (8192, 32768, 131072)
CARDS = ("h100_80gb", "h200")
TPS, PPS, CPS = (1, 2, 4, 8), (1, 2, 4, 8, 16), (1, 2, 4, 8, 16)
DP_SHARD, BATCH, PRECISION = 8, 1, "bf16_master"
GiB = devices.GiB
OUT = Path(__file__).resolve().parent / "figures"


@functools.lru_cache(maxsize=None)
def model_cfg(name: str, seq: int) -> ModelConfig:
    """conf/model/NAME.yaml as a typed ModelConfig (the predict layer's input) at ``seq`` tokens
    (read once per name and length: a ModelConfig is frozen)."""
    cfg = OmegaConf.merge(
        OmegaConf.structured(ModelConfig), OmegaConf.load(Path(CONF_DIR) / "model" / f"{name}.yaml")
    )
    cfg.max_seq_len = seq
    return as_model_config(cfg)


def layouts(cfg):
    for tp, pp, cp in itertools.product(TPS, PPS, CPS):
        if cfg.n_head % tp or cfg.n_kv_head % tp:
            continue
        yield LayoutConfig(tp=tp, sp=tp > 1, pp=pp, cp=cp, dp_shard=DP_SHARD)


def smallest(cfg, seq: int, strategy: str, card: str):
    """(gpus, peak, layout, per-rank rows, fit) of the smallest layout that fits, or None."""
    device = devices.device_of(LayoutConfig(gpu=card))
    best = None
    for lay in layouts(cfg):
        gpus = lay.tp * lay.pp * lay.cp
        if best is not None and gpus > best[0]:
            continue
        rows = per_gpu.stage_bytes(cfg, lay, strategy, BATCH, seq, PRECISION)
        peak = max(r["total"] for r in rows)
        fit = device.fit(peak, devices.communicators(lay))
        if fit["fits"] and (best is None or (gpus, peak) < best[:2]):
            best = (gpus, peak, lay, rows, fit)
    return best


def grid(models=MODELS, seqs=SEQS, cards=CARDS) -> list[dict]:
    out = []
    for name, seq, card, strat in itertools.product(models, seqs, cards, per_gpu.STRATEGIES):
        cfg = model_cfg(name, seq)
        found = smallest(cfg, seq, strat, card)
        row = {"model": name, "seq": seq, "card": card, "strategy": strat}
        if found is not None:
            gpus, peak, lay, rows, fit = found
            busiest = max(rows, key=lambda r: r["total"])
            row.update(
                gpus=gpus,
                layout=f"tp{lay.tp} pp{lay.pp} cp{lay.cp}",
                rank=busiest["rank"],
                **{k: busiest[k] for k in (*per_gpu.KINDS, "total", "phase")},
                reserve=fit["reserve"]["total"],
                margin=fit["margin_bytes"],
            )
            if strat == "full":
                device = devices.device_of(LayoutConfig(gpu=card))
                row["planner"] = per_gpu.plan_stages(
                    cfg, lay, device.budget(devices.communicators(lay)), BATCH, seq, PRECISION
                )["strategies"]
        out.append(row)
    return out


def markdown(rows: list[dict]) -> str:
    res = devices.Reserve()
    lines = [
        "# What fits: per-GPU bytes of the smallest layout per strategy",
        "",
        f"bf16 + fp32 master weights and AdamW, micro-batch {BATCH}, FSDP dp_shard={DP_SHARD}, SP "
        "on when tp > 1, 1F1B (m = pp), CUDA flash SDPA; GiB = 2^30 B; the busiest pipeline "
        "rank's step peak (its binding phase) against the card's total as torch reports it "
        f"({', '.join(f'{c} {devices.card(c).total_gib:.2f} GiB' for c in CARDS)}) less the "
        f"default reserve: CUDA context {res.context_bytes / GiB:g} GiB + NCCL "
        f"{res.comm_bytes_per_group / GiB:g} GiB per communicator + {res.fragmentation:.0%} of "
        "the peak for fragmentation (recompute_lab.predict.devices). Generated by "
        "experiments/what_fits.py (recompute_lab.predict.per_gpu). Per-stage planner (on the "
        "`full` row's layout): per stage, the base strategy + n/L full = n of the stage's L layers "
        "recomputed fully, the fewest recompute FLOPs that fit after the reserve.",
        "",
        "| model | seq | card | strategy | GPUs / replica | layout | rank | model state | "
        "activations | peak | phase | reserve | margin | per-stage planner |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['model']} | {r['seq'] // 1024}k | {r['card']} | {r['strategy']} |"
        if "gpus" not in r:
            lines.append(
                f"{head} no fit up to tp{max(TPS)} pp{max(PPS)} cp{max(CPS)} | | | | | | | | | |"
            )
            continue
        gib = " | ".join(f"{r[k] / GiB:.1f}" for k in (*per_gpu.KINDS, "total"))
        plan = _runs(r["planner"]) if "planner" in r else ""
        lines.append(
            f"{head} {r['gpus']} | {r['layout']} | {r['rank']} | {gib} | {r['phase']} | "
            f"{r['reserve'] / GiB:.1f} | {r['margin'] / GiB:.1f} | {plan} |"
        )
    import matplotlib

    lines += ["", f"![what fits](what_fits.png) (matplotlib {matplotlib.__version__})"]
    return "\n".join(lines) + "\n"


def _runs(plan: list) -> str:
    """Per-stage labels, repeats grouped: ['full', 'full', 'none + 30/32 full'] -> 'full (2 stages),
    none + 30/32 full'
    (n/L full: n of the stage's L layers recomputed fully, the rest under the base strategy)."""
    out = [[k, len(list(g))] for k, g in itertools.groupby(plan)]
    return ", ".join(f"{k}" + (f" ({n} stages)" if n > 1 else "") for k, n in out)


def figure(rows: list[dict], path: Path) -> None:
    from recompute_lab.analysis import style

    style.apply()
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    cards = list(dict.fromkeys(r["card"] for r in rows))
    seqs = list(dict.fromkeys(r["seq"] for r in rows))
    fig, axes = plt.subplots(
        len(cards),
        len(models),
        figsize=(5 * len(models), 3 * len(cards)),
        sharey=True,
        squeeze=False,
    )
    width = 0.8 / len(per_gpu.STRATEGIES)
    for (i, dev), (j, name) in itertools.product(enumerate(cards), enumerate(models)):
        ax = axes[i][j]
        for k, strat in enumerate(per_gpu.STRATEGIES):
            sel = [
                r
                for r in rows
                if r["model"] == name and r["card"] == dev and r["strategy"] == strat
            ]
            xs = [n + (k - 1) * width for n in range(len(seqs))]
            ys = [r.get("gpus", 0) for r in sel]
            color, _ = style.strategy_style(strat)
            ax.bar(xs, ys, width, label=strat, color=color, edgecolor="black", lw=0.5)
            for x, y in zip(xs, ys):
                # per replica, and below it the total: every replica is sharded dp_shard ways
                ax.text(
                    x,
                    y if y else 2**8,
                    f"{y}\n={y * DP_SHARD}" if y else "no\nfit",
                    ha="center",
                    va="bottom",
                    fontsize=6.5,
                )
        ax.set_yscale("log", base=2)
        ax.set_ylim(1, 2**11)  # from 1 GPU; room for the two-line labels above the tallest bar
        ax.set_xticks(range(len(seqs)), [f"{s // 1024}k" for s in seqs])
        ax.set_title(f"{name}, {dev} ({devices.card(dev).total_gib:.1f} GiB)", fontsize=9)
        if j == 0:
            ax.set_ylabel(
                f"GPUs per replica (tp x pp x cp)\nlabel: per replica, =total (x{DP_SHARD} FSDP)"
            )
    axes[0][0].legend(fontsize=7, title="recompute", title_fontsize=7)
    fig.suptitle(
        f"Smallest layout that fits after the reserve (predicted, micro-batch {BATCH}; no fit: "
        f"none up to tp{max(TPS)} pp{max(PPS)} cp{max(CPS)})\nbar = GPUs per model replica; "
        f"each replica is sharded over FSDP dp_shard={DP_SHARD}, so the total ('=' label) is "
        f"{DP_SHARD}x: 8 per replica = {8 * DP_SHARD} GPUs",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def _row(cells: list, r: dict, fit: dict) -> str:
    """One README table row: ``cells``, then the peak (its phase) and the margin (the verdict), in
    GiB."""
    verdict = "fits" if fit["fits"] else "does not fit"
    cells = [*cells, f"{r['total'] / GiB:.2f} ({r['phase']})"]
    cells.append(f"{fit['margin_bytes'] / GiB:.2f} ({verdict})")
    return "| " + " | ".join(cells) + " |"


def hf_model(name: str):
    """A Hugging Face model's typed config (model=hf model.hf.config=NAME, resolved)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import compose_cfg

    from recompute_lab.config.spec import RunSpec

    return RunSpec.of(compose_cfg(["model=hf", f"model.hf.config={name}"])).model


def readme_values() -> dict:
    """The figures README's "Planning a large run" quotes, as it quotes them (tests/unit/
    test_what_fits.py requires each in README; what_fits.md's rows are checked against the grid)."""
    h100 = LayoutConfig(dp_shard=8, gpu="h100_80gb")
    lay8 = h100
    dev, groups = devices.device_of(lay8), devices.communicators(lay8)
    cfg8 = model_cfg("llama3_8b", 8192)
    rows8b = []
    for name in per_gpu.STRATEGIES:
        (r,) = per_gpu.stage_bytes(cfg8, lay8, name, 1, 8192, PRECISION)
        cells = [name, f"{r['model_state'] / GiB:.2f}", f"{r['activations'] / GiB:.2f}"]
        rows8b.append(_row(cells, r, dev.fit(r["total"], groups)))
    (hf,) = per_gpu.stage_bytes(hf_model("llama3_8b"), lay8, "none", 1, 8192, PRECISION)
    cards = ["| preset | total torch reports | GiB |", "|---|---|---|"]
    for c in devices.CARDS.values():
        cards.append(f"| `{c.name}` | {c.total_bytes:,} B | {c.total_gib:.2f} |")
    cfg70 = model_cfg("llama3_70b", 8192)
    rows70b, peaks = [], {}
    for sp in (True, False):
        lay = LayoutConfig(tp=8, sp=sp, dp_shard=8, gpu="h100_80gb")
        for name in ("none", "selective"):
            (r,) = per_gpu.stage_bytes(cfg70, lay, name, 1, 8192, PRECISION)
            peaks[sp, name] = r["total"]
            if name == "none":
                layer = per_gpu.micro_batch(cfg70, 8, sp, "none", 1, 8192)["layer"]
                fit = dev.fit(r["total"], devices.communicators(lay))
                cells = ["SP on" if sp else "SP off", f"{layer / GiB:.3f}"]
                cells += [f"{r['activations'] / GiB:.2f}", f"{r['model_state'] / GiB:.2f}"]
                rows70b.append(_row(cells, r, fit))
    from recompute_lab.predict import layout as L

    def full_row(name: str, seq: int, card: str) -> tuple[str, str]:
        """what_fits.md's `full` row for (name, seq, card): its layout and per-stage plan."""
        cfg = model_cfg(name, seq)
        _, _, lay, _, _ = smallest(cfg, seq, "full", card)
        budget = devices.device_of(LayoutConfig(gpu=card)).budget(devices.communicators(lay))
        plan = per_gpu.plan_stages(cfg, lay, budget, BATCH, seq, PRECISION)["strategies"]
        return f"tp{lay.tp} pp{lay.pp} cp{lay.cp}", _runs(plan)

    # +strategy=budget under the same layout: every planner option priced per rank, one solve
    from recompute_lab.config.strategies import BudgetConfig
    from recompute_lab.measure.tensor_parallel import measure_micro_batch
    from recompute_lab.strategies.budget.layout import budget_layout

    planned = budget_layout(
        cfg8, lay8, BudgetConfig(), 1, 8192, PRECISION, "cuda", measure_micro_batch
    )
    (b8,) = planned["stages"]
    (n8,) = per_gpu.plan_stages(cfg8, lay8, dev.budget(groups), 1, 8192, PRECISION)["stages"]
    return {
        "budget8": b8["strategy"],
        "budget8_tflop": f"{b8['recompute_flops'] / 1e12:.1f}",
        "budget8_peak": f"{b8['total'] / GiB:.2f}",
        "budget8_margin": f"{dev.fit(b8['total'], groups)['margin_bytes'] / GiB:.2f}",
        "nfull8": n8["strategy"],
        "nfull8_tflop": f"{n8['recompute_flops'] / 1e12:.1f}",
        "rows8b": "\n".join(rows8b),
        "hf_none": f"{hf['total'] / GiB:.2f}",
        "cards": "\n".join(cards),
        "rows70b": "\n".join(rows70b),
        "kor": L.korthikanti_tp_layer_bytes(8192, 1, cfg70.d_model, cfg70.n_head, 8, True, "none")
        / GiB,
        "sel": peaks[True, "selective"] / GiB,
        "none": peaks[True, "none"] / GiB,
        "f405h100": full_row("llama3_405b", 131072, "h100_80gb")[0],
        "f405h200": full_row("llama3_405b", 131072, "h200")[0],
        "plan70": full_row("llama3_70b", 8192, "h200")[1],
        "plan405": full_row("llama3_405b", 32768, "h100_80gb")[1],
    }


def parse_overrides(items: list[str]) -> dict:
    """``models=[llama3_8b,llama3_70b] seq_lens=[8192] cards=[h100_80gb]`` (Hydra's override
    syntax, as the apps take it) as the grid's axes; anything else is an error naming the keys."""
    known = {"models": MODELS, "seq_lens": SEQS, "cards": CARDS}
    given = OmegaConf.to_container(OmegaConf.from_dotlist(items)) if items else {}
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise SystemExit(f"what_fits: unknown key(s) {unknown}; valid: {', '.join(known)}")
    out = {}
    for key, default in known.items():
        value = given.get(key, list(default))
        value = value if isinstance(value, list) else [value]
        if not value:
            raise SystemExit(f"what_fits: {key} is empty")
        out[key] = tuple(value)
    models = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml") if p.stem != "hf")
    for name in out["models"]:
        if str(name) not in models:
            raise SystemExit(f"what_fits: unknown model {name!r}; valid: {', '.join(models)}")
    for card in out["cards"]:
        try:
            devices.card(str(card))
        except Exception as e:
            raise SystemExit(f"what_fits: {e}") from None
    if any(not isinstance(s, int) or s < 1 for s in out["seq_lens"]):
        raise SystemExit(f"what_fits: seq_lens must be positive integers, got {out['seq_lens']}")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: experiments/figures for the committed grid, "
        "outputs/what_fits for a grid of your own)",
    )
    ap.add_argument("overrides", nargs="*", help="models=[...] seq_lens=[...] cards=[...]")
    args = ap.parse_args(argv)
    axes = parse_overrides(args.overrides)
    if args.out is None:  # the committed figure is the default grid's; another grid goes elsewhere
        args.out = OUT if not args.overrides else Path("outputs") / "what_fits"
    t0 = time.perf_counter()
    rows = grid(axes["models"], axes["seq_lens"], axes["cards"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "what_fits.md").write_text(markdown(rows))
    figure(rows, args.out / "what_fits.png")
    print(
        f"wrote {args.out / 'what_fits.md'} and what_fits.png in {time.perf_counter() - t0:.1f} s"
    )


if __name__ == "__main__":
    main()
