"""Predict published end-to-end training results that nobody here produced, from their stated
configurations, and publish the error (recompute_lab.predict.step_time; nothing tuned per row).

    python experiments/published_check.py          # writes experiments/figures/published_check.md

Input: experiments/data/published_results.json (every entry cites its source: paper table,
repository file, with the model's shapes, GPUs, layout, batch, precision and recompute setting).
An entry is predicted when everything the model needs is stated or a stated assumption fills it
(micro-batch 1 where a paper gives none); otherwise it is listed with the reason it is not
(fp8 matmuls, op-level SAC, schedules or recompute settings not stated). Compared figure, in
order of preference: iteration seconds; hardware TFLOP/s per GPU (Megatron-LM 2021 counts the
recomputed FLOPs: our HFU x peak); MFU; tokens/s per GPU. Error is in throughput: ours /
published - 1 (published / ours - 1 for seconds), so > 0 means the model is optimistic.
tests/unit/test_published_check.py recomputes the table and holds the committed one to it.

Layer: experiments.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from recompute_lab.config import ConfigError, LayoutConfig, ModelConfig
from recompute_lab.config.spec import as_model_config
from recompute_lab.predict import layout as L
from recompute_lab.predict import step_time as T

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "published_results.json"
OUT = HERE / "figures" / "published_check.md"


def model_of(e: dict) -> ModelConfig:
    """Our GPT with the entry's shapes: Llama-style (RMSNorm, SwiGLU, RoPE) when the source says
    SwiGLU, else GPT-3 style (LayerNorm, GELU, learned positions); flash attention (sdpa) unless
    the run predates it (Megatron-LM 2021 / 2022: eager attention with fused softmax)."""
    m = e["model"]
    arch = str(m.get("arch", ""))
    llama = "SwiGLU" in arch
    eager = e["id"].startswith(("narayanan2021", "korthikanti2022"))
    cfg = ModelConfig(
        name=m["name"],
        n_layer=int(m["n_layer"]),
        d_model=int(m["d_model"]),
        n_head=int(m["n_head"]),
        n_kv_head=int(m["n_kv_head"]) if m.get("n_kv_head") else None,
        d_ff=int(m["d_ff"]),
        vocab_size=int(m["vocab"]),
        max_seq_len=int(m["seq_len"]),
        norm="rmsnorm" if llama else "layernorm",
        mlp="swiglu" if llama else "gelu",
        positions="rope" if llama else "learned",
        bias=not llama,
        tie_embeddings=False,
        attention="eager" if eager else "sdpa",
    )
    return as_model_config(OmegaConf.structured(cfg))


def strategy_of(e: dict) -> str:
    text = str(e.get("recompute", "")).lower()
    if "per-op" in text or "op'" in text:
        raise ValueError("op-level SAC: the step-time model times whole strategies")
    for name in ("none", "selective", "full"):
        if text.startswith(name):
            return name
    raise ValueError(f"recompute setting not stated ({e.get('recompute')!r})")


def layout_of(e: dict) -> tuple:
    """(LayoutConfig, micro-batch, assumptions) from the entry's layout and batch."""
    lay, notes = e["layout"], []
    tp, pp, cp, dp = (int(lay.get(k) or 1) for k in ("tp", "pp", "cp", "dp"))
    b = e.get("micro_batch")
    if b is None:
        b = 1
        notes.append("micro-batch 1 assumed")
    v = int(lay.get("virtual_stages") or 1)
    sched = str(lay.get("pipeline_schedule", "")).lower()
    if pp > 1 and ("not stated" in sched or "modified" in sched) and not lay.get(
        "microbatches_per_pipeline"
    ):
        if "interleaved" in sched:
            raise ValueError("interleaved schedule with virtual stages not stated")
        notes.append("1F1B assumed")
    fsdp = "fsdp" in str(lay.get("dp_type", "")).lower()
    m = int(e["global_batch"]) // (dp * int(b))
    if m < 1 or m * dp * int(b) != int(e["global_batch"]):
        raise ValueError("global batch not a multiple of dp x micro-batch")
    out = LayoutConfig(
        tp=tp,
        sp=bool(lay.get("sequence_parallel")) and tp > 1,
        pp=pp,
        pp_schedule="interleaved" if v > 1 else "one_f_one_b",
        pp_virtual=v,
        microbatches=m,
        cp=cp,
        dp_shard=dp if fsdp else 1,
        dp_replicate=1 if fsdp else dp,
    )
    return OmegaConf.structured(out), int(b), notes


def compare(e: dict, t: dict, rates: T.Rates) -> tuple[str, float, float]:
    """(metric, published, ours) for the preferred published figure."""
    pub = e["published"]
    gpus = int(e["n_gpus"])
    if "iteration_s" in pub:
        return "iteration s", float(pub["iteration_s"]), t["step_s"]
    if "tflops_per_gpu" in pub and e["id"].startswith("narayanan2021"):
        return "TFLOP/s/GPU (with recompute)", float(pub["tflops_per_gpu"]), (
            t["hfu"] * rates.bf16_flops / 1e12
        )
    if "mfu" in pub:
        return "MFU", float(pub["mfu"]), t["mfu"]
    if "tokens_per_s_per_gpu" in pub:
        return "tokens/s/GPU", float(pub["tokens_per_s_per_gpu"]), t["tokens_per_s"] / gpus
    raise ValueError(f"no figure this check compares ({sorted(pub)})")


def check(entries: list[dict]) -> tuple[list[dict], list[dict]]:
    """(predicted rows, skipped entries with their reason)."""
    rows, skipped = [], []
    for e in entries:
        try:
            if "float8" in str(e.get("precision", "")).lower():
                raise ValueError("fp8 matmuls: no fp8 rate in the model")
            strategy = strategy_of(e)
            cfg = model_of(e)
            lay, b, notes = layout_of(e)
            if L.n_gpus(lay) != int(e["n_gpus"]):
                raise ValueError(f"layout gives {L.n_gpus(lay)} GPUs, the source {e['n_gpus']}")
            if "96 GB" in str(e.get("notes", "")) or "96GB" in str(e.get("notes", "")):
                notes.append("H100 96 GB HBM2e at 500 W, timed with h100_80gb rates")
            rates = T.rates_of(e["gpu"])
            t = T.step_time(cfg, lay, strategy, b, int(e["model"]["seq_len"]), rates)
            metric, pub, ours = compare(e, t, rates)
        except (ValueError, ConfigError, KeyError, TypeError) as err:
            skipped.append({"id": e["id"], "reason": str(err)})
            continue
        rows.append(
            {
                "id": e["id"],
                "gpus": int(e["n_gpus"]),
                "gpu": e["gpu"],
                "layout": f"tp{lay.tp} pp{lay.pp}"
                + (f"v{lay.pp_virtual}" if int(lay.pp_virtual) > 1 else "")
                + f" cp{lay.cp} dp{int(lay.dp_shard) * int(lay.dp_replicate)}"
                + (" fsdp" if int(lay.dp_shard) > 1 else "")
                + (" sp" if lay.sp else "")
                + f" m{lay.microbatches} b{b}",
                "strategy": strategy,
                "metric": metric,
                "published": pub,
                "ours": ours,
                # as a throughput: > 0 means the model predicts a faster step than published
                "error": (pub / ours if metric == "iteration s" else ours / pub) - 1,
                "assumptions": notes,
                "source": e["source"].split(",")[0],
            }
        )
    return rows, skipped


def by_card(rows: list[dict]) -> list[str]:
    """One line per card: how many rows, median and worst error."""
    out = []
    for gpu in sorted({r["gpu"] for r in rows}):
        errs = [r["error"] for r in rows if r["gpu"] == gpu]
        worst = max(errs, key=abs)
        out.append(
            f"- {gpu}: {len(errs)} results, median error {statistics.median(errs):+.1%}, "
            f"worst {worst:+.1%}"
        )
    return out


def table(rows: list[dict], skipped: list[dict]) -> str:
    errs = [abs(r["error"]) for r in rows]
    signed = [r["error"] for r in rows]
    worst = max(rows, key=lambda r: abs(r["error"]))
    lines = [
        "# Published training results vs recompute_lab's step-time model",
        "",
        "Generated by `python experiments/published_check.py` from experiments/data/"
        "published_results.json (each entry cites its source); rates: "
        "recompute_lab/assets/gpu_specs.json; efficiencies: the model's defaults "
        f"{T.Efficiency()} (not calibrated on these cards, nothing tuned per row).",
        "",
        f"{len(rows)} results predicted: median |error| {statistics.median(errs):.1%}, "
        f"median signed error {statistics.median(signed):+.1%}, worst {worst['error']:+.1%} "
        f"({worst['id']}). Errors are in throughput: positive means the model predicts a "
        "faster step than was published (optimistic).",
        "",
        *by_card(rows),
        "",
        "| id | GPUs | layout | recompute | figure | published | ours | error | assumptions |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['id']} | {r['gpus']} x {r['gpu']} | {r['layout']} | {r['strategy']} | "
            f"{r['metric']} | {r['published']:g} | {r['ours']:.4g} | {r['error']:+.1%} | "
            f"{'; '.join(r['assumptions']) or '-'} |"
        )
    lines += ["", "Not predicted:", ""]
    lines += [f"- {s['id']}: {s['reason']}" for s in skipped]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    rows, skipped = check(json.loads(DATA.read_text()))
    text = table(rows, skipped)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
