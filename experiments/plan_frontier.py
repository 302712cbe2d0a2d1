"""Predicted tokens/s against memory per GPU for every candidate the advisor ranks, with the
fitting frontier marked: what each extra GiB buys, and where recomputation pays.

    python experiments/plan_frontier.py     # Llama-3 8B, s=8192, 8 x H100 80GB, global batch 8

Writes experiments/figures/plan_frontier.csv (one row per candidate: layout, micro-batch,
strategy, busiest rank's peak, margin, tokens/s per GPU, MFU) and plan_frontier.png. The frontier
is the candidates that fit and that no other fitting candidate beats on both tokens/s and memory.
Times are recompute_lab.predict.step_time's (datasheet rates x default efficiencies; see
experiments/figures/published_check.md for how far they are from published runs).
tests/unit/test_plan_frontier.py recomputes the CSV.

Layer: experiments.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from what_fits import model_cfg  # noqa: E402

from recompute_lab.config import LayoutConfig  # noqa: E402
from recompute_lab.predict import advisor, devices  # noqa: E402

OUT = HERE / "figures"
MODEL, SEQ, GPUS, CARD = "llama3_8b", 8192, 8, "h100_80gb"
COLUMNS = (
    "layout",
    "micro_batch",
    "strategy",
    "peak_gib",
    "margin_gib",
    "fits",
    "tokens_per_s_per_gpu",
    "mfu",
    "frontier",
)


def rows() -> list[dict]:
    res = advisor.advise(model_cfg(MODEL, SEQ), SEQ, GPUS, CARD)
    out = []
    for r in res["rows"]:
        lay = r["layout"]
        out.append(
            {
                "layout": f"tp{lay['tp']} pp{lay['pp']} cp{lay['cp']} dp{lay['dp_shard']} "
                f"m{lay['microbatches']}",
                "micro_batch": r["micro_batch"],
                "strategy": r["strategy"],
                "peak_gib": round(r["peak_bytes"] / devices.GiB, 3),
                "margin_gib": round(r["margin_bytes"] / devices.GiB, 3),
                "fits": r["fits"],
                "tokens_per_s_per_gpu": round(r["tokens_per_s_per_gpu"], 1),
                "mfu": round(r["mfu"], 4),
            }
        )
    fitting = [r for r in out if r["fits"]]
    for r in out:
        r["frontier"] = r["fits"] and not any(
            o is not r
            and o["tokens_per_s_per_gpu"] >= r["tokens_per_s_per_gpu"]
            and o["peak_gib"] <= r["peak_gib"]
            and (o["tokens_per_s_per_gpu"], -o["peak_gib"])
            != (r["tokens_per_s_per_gpu"], -r["peak_gib"])
            for o in fitting
        )
    return out


def to_csv(data: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(data)
    return buf.getvalue()


def figure(data: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = devices.device_of(LayoutConfig(gpu=CARD))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    styles = {"none": ("o", "#1b9e77"), "selective": ("s", "#d95f02"), "full": ("^", "#7570b3")}
    for name, (marker, color) in styles.items():
        pts = [r for r in data if r["strategy"] == name]
        ax.scatter(
            [r["peak_gib"] for r in pts],
            [r["tokens_per_s_per_gpu"] for r in pts],
            marker=marker,
            color=color,
            alpha=0.6,
            label=name,
            s=22,
        )
    plans = [r for r in data if r["strategy"] not in styles]
    ax.scatter(
        [r["peak_gib"] for r in plans],
        [r["tokens_per_s_per_gpu"] for r in plans],
        marker="D",
        color="#e7298a",
        alpha=0.7,
        label="per-stage n/L full",
        s=22,
    )
    front = sorted((r for r in data if r["frontier"]), key=lambda r: r["peak_gib"])
    ax.plot(
        [r["peak_gib"] for r in front],
        [r["tokens_per_s_per_gpu"] for r in front],
        color="black",
        lw=1.2,
        label="frontier (fits, undominated)",
    )
    limit = budget.budget(1) / devices.GiB  # with one communicator (the layouts add theirs)
    ax.axvline(limit, color="grey", ls="--", lw=1)
    ax.text(
        limit,
        ax.get_ylim()[0],
        " card after the reserve (1 communicator)",
        color="grey",
        fontsize=8,
        va="bottom",
        rotation=90,
    )
    ax.set_xlabel("busiest rank's predicted peak (GiB)")
    ax.set_ylabel("predicted tokens/s per GPU")
    ax.set_title(
        f"Llama-3 8B, s={SEQ}, {GPUS} x H100 80GB, global batch {GPUS}: every "
        "candidate (predicted)",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    data = rows()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "plan_frontier.csv").write_text(to_csv(data))
    figure(data, args.out / "plan_frontier.png")
    front = [r for r in data if r["frontier"]]
    print(f"{len(data)} candidates, {sum(r['fits'] for r in data)} fit, frontier:")
    for r in sorted(front, key=lambda r: r["peak_gib"]):
        print(
            f"  {r['peak_gib']:7.2f} GiB  {r['tokens_per_s_per_gpu']:9,.0f} tok/s/GPU  "
            f"{r['layout']} b{r['micro_batch']} {r['strategy']}"
        )


if __name__ == "__main__":
    main()
