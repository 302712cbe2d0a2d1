"""The seed notebook's "activation memory vs context length" plot, corrected.

The notebook drew 2 B x 2 x hidden per token per layer (24 layers, hidden 4096, batch 1). This
script measures
the real saved-for-backward bytes of that transformer on the meta device (nothing allocated), in
16-bit with
dropout (Korthikanti et al. 2022's setting), with eager attention (s^2 scores saved) and with SDPA
(fused
kernel of the target device), without and with full recomputation, and sets beside them
Korthikanti's
sbh(34 + 5as/h) per layer and the notebook's line. Only the 24 layers are plotted (as both formulas
count);
the CSV also has the totals with embeddings and the fp32 logits.

    python experiments/activation_vs_context.py [OUT_DIR] [--target cuda|cpu]     (default
    experiments/out)
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from recompute_lab.predict import theory  # noqa: E402
from recompute_lab.config import CONF_DIR  # noqa: E402
from recompute_lab.cli.estimate import GB  # noqa: E402
from recompute_lab.measure.memory import meta_saved_tensors  # noqa: E402
from recompute_lab.model.gpt import build_model  # noqa: E402
from recompute_lab.strategies import Shape, apply_strategy  # noqa: E402
from recompute_lab.config.spec import RunSpec

CONTEXTS = [512, 1024, 2048, 4096, 8192]  # the notebook's context lengths


def layer_bytes(by_module: dict) -> int:
    return sum(v for k, v in by_module.items() if k.startswith("blocks."))


def measure(target: str, contexts: list[int] = CONTEXTS) -> list[dict]:
    rows = []
    for attention in ("eager", "sdpa"):
        for strategy in ("none", "full"):
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cfg = compose(
                    config_name="config",
                    overrides=[
                        "+experiment=seed_activation_vs_context",
                        f"model.attention={attention}",
                        f"+strategy={strategy}",
                    ],
                )
            m = cfg.model
            model = build_model(m, "meta", torch.bfloat16)  # 16-bit parameters and activations
            plan = apply_strategy(model, cfg.strategy, RunSpec.of(cfg).shape())
            model.train()
            for s in contexts:
                b = cfg.data.batch_size
                counted = meta_saved_tensors(model, b, s, target)
                pred = theory.predict_activations(
                    m, Shape(b, s, "bf16_master", device=target), plan
                )
                rows.append(
                    {
                        "attention": attention,
                        "strategy": strategy,
                        "seq_len": s,
                        "batch_size": b,
                        "layers_measured": layer_bytes(counted["by_module"]),
                        "layers_theory": layer_bytes(pred["by_module"]),
                        "total_measured": counted["total"],
                        "logits": pred["logits"],
                        "korthikanti": m.n_layer
                        * theory.korthikanti_layer_bytes(s, b, m.d_model, m.n_head),
                        "naive": m.n_layer * theory.naive_layer_bytes(s, b, m.d_model),
                    }
                )
    return rows


def plot(rows: list[dict], path: Path, target: str) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ref = [r for r in rows if r["attention"] == "eager" and r["strategy"] == "none"]
    xs = [r["seq_len"] for r in ref]
    ax.plot(
        xs,
        [r["korthikanti"] / GB for r in ref],
        "-",
        color="0.6",
        lw=6,
        alpha=0.5,
        label="Korthikanti sbh(34+5as/h) x 24",
    )
    ax.plot(xs, [r["naive"] / GB for r in ref], "k:", label="seed notebook: 2*2*h bytes/token x 24")
    styles = {
        ("eager", "none"): ("C3", "o", "-", 7),
        ("sdpa", "none"): ("C0", "s", "-", 7),
        ("eager", "full"): ("C3", "o", "--", 10),
        ("sdpa", "full"): ("C0", "s", "--", 5),
    }
    for (att, strat), (color, marker, line, size) in styles.items():
        pts = [r for r in rows if r["attention"] == att and r["strategy"] == strat]
        note = " (= block inputs, both backends)" if strat == "full" else ""
        ax.plot(
            [r["seq_len"] for r in pts],
            [r["layers_measured"] / GB for r in pts],
            color=color,
            marker=marker,
            ls=line,
            ms=size,
            mfc="none" if strat == "full" else color,
            label=f"measured (meta, {target} kernels): {att}, {strat}{note}",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="context length (tokens)",
        ylabel="activation memory (GB, 24 layers)",
        title="Activation memory vs context length: 24 x 4096, batch 1, bf16, dropout 0.1",
    )
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="experiments/out", help="folder for the PNG and CSV")
    ap.add_argument(
        "--target",
        choices=["cuda", "cpu"],
        default="cuda",
        help="whose kernels decide what is saved",
    )
    ap.add_argument(
        "--contexts", type=int, nargs="+", default=CONTEXTS, help="context lengths (max 8192)"
    )
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = measure(args.target, args.contexts)
    with open(out / "activation_vs_context.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "activation_vs_context.png", args.target)
    for r in rows:
        print(
            f"{r['attention']:5s} {r['strategy']:4s} s={r['seq_len']:5d}"
            f"  measured {r['layers_measured'] / GB:8.2f} GB  theory {r['layers_theory'] / GB:8.2f}"
            f"  Korthikanti {r['korthikanti'] / GB:8.2f}"
            f"  naive {r['naive'] / GB:6.2f}"
        )
    print(f"wrote {out / 'activation_vs_context.png'} and .csv")


if __name__ == "__main__":
    main()
