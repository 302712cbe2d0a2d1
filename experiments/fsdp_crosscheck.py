"""Per-GPU bytes of Llama-3 8B and 70B under FSDP2 (and FSDP x TP): PyTorch's own FSDPMemTracker,
run over a training step on a fake process group under FakeTensorMode (torchtitan's estimator, on
CPU fake tensors: recompute_lab.measure.fsdp_tracker), beside recompute_lab.predict's per-GPU bytes
(per_gpu.stage_bytes), category by category, with the named terms that explain each difference.

to run (23 min here on 2 CPU cores shared with a test run; --models llama3_8b alone: 3-4 min):

    PYTHONPATH=. python experiments/fsdp_crosscheck.py

writes experiments/figures/fsdp_crosscheck.md (and prints it). bf16_master (fp32 shards, bf16
gathers, fp32 reduce-scatter), one sequence of 2048 tokens per GPU, the busiest-by-shape rank (the
last one). tests/integration/test_fsdp_crosscheck.py checks that the committed table's prediction
column is what the current code predicts.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from recompute_lab.config import CONF_DIR, ModelConfig  # noqa: E402
from recompute_lab.config.spec import as_model_config  # noqa: E402
from recompute_lab.measure import fsdp_tracker as F  # noqa: E402

OUT = "experiments/figures/fsdp_crosscheck.md"
COMMAND = "PYTHONPATH=. python experiments/fsdp_crosscheck.py"


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    dp_shard: int
    tp: int = 1
    strategy: str = "none"
    seq: int = 2048
    batch: int = 1
    precision: str = "bf16_master"

    @property
    def label(self) -> str:
        return f"FSDP {self.dp_shard}" + (f" x TP {self.tp} (sp)" if self.tp > 1 else "")

    @property
    def rank(self) -> int:
        return self.dp_shard * self.tp - 1


CASES = [
    Case("llama3_8b", 8),
    Case("llama3_8b", 8, strategy="full"),
    Case("llama3_8b", 4, 2),
    Case("llama3_70b", 8),
    Case("llama3_70b", 8, strategy="full"),
    Case("llama3_70b", 8, 8),
]


def model_cfg(name: str) -> ModelConfig:
    path = Path(CONF_DIR) / "model" / f"{name}.yaml"
    return as_model_config(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))


def prediction_of(case: Case) -> dict:
    """The prediction side alone (no tracker): what the committed table's guard recomputes."""
    lay = F.layout_of(case.dp_shard, case.tp, sp=case.tp > 1)
    return F.predicted(
        model_cfg(case.model), lay, case.strategy, case.batch, case.seq, case.precision
    )


def gib(n: int) -> str:
    return f"{n / 2**30:.3f}"


def run(case: Case) -> dict:
    t0 = time.perf_counter()
    rep = F.crosscheck(
        model_cfg(case.model),
        case.dp_shard,
        case.tp,
        case.precision,
        case.batch,
        case.seq,
        sp=case.tp > 1,
        rank=case.rank,
        strategy=case.strategy,
    )
    rep["seconds"] = time.perf_counter() - t0
    return rep


def table(results: list[tuple[Case, dict]], elapsed: float) -> str:
    import torch

    lines = [
        "# Per-GPU bytes under FSDP2 (x TP): PyTorch's FSDPMemTracker vs recompute_lab.predict",
        "",
        f"Regenerate: `{COMMAND}` ({elapsed / 60:.1f} min here, {os.cpu_count()} CPU cores). "
        f"torch {torch.__version__}, {datetime.date.today().isoformat()}.",
        "",
        "The tracker (torch.distributed._tools.fsdp2_mem_tracker.FSDPMemTracker) runs a second "
        "training step (forward, backward, gradient clipping, AdamW step) of our GPT built with "
        "the model's shapes, on fake CPU tensors over a fake process group, as the last global "
        "rank; `predicted` is recompute_lab.predict.per_gpu.stage_bytes for that layout "
        "(model state split by layout.model_state_per_rank, buffers from peak.buffer_bytes). "
        "bf16_master: fp32 parameter shards (the master weights), bf16 all-gathers, fp32 "
        "reduce-scatters. Batch 1, 2048 tokens. GiB = 2^30 B; differences in bytes "
        "(tracker - predicted). `residual` = difference - named terms.",
        "",
        "| model | layout | strategy | category | predicted (B) | predicted GiB | tracker GiB "
        "| difference (B) | named terms (B) | residual (B) | terms |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for case, rep in results:
        for row in rep["rows"]:
            names = "; ".join(f"{t['name']}: {t['bytes']:+d}" for t in row["terms"])
            if row["category"] == "peak":
                names = f"predicted phase {rep['predicted']['phase']}" + (
                    f"; {names}" if names else ""
                )
            lines.append(
                f"| {case.model} | {case.label} | {case.strategy} | {row['category']} "
                f"| {row['predicted']} | {gib(row['predicted'])} | {gib(row['tracker'])} "
                f"| {row['difference']:+d} | {sum(t['bytes'] for t in row['terms']):+d} "
                f"| {row['residual']:+d} | {names} |"
            )
    lines += [
        "",
        "The tracker's peak snapshot by category (GiB), and the seconds each case took:",
        "",
        "| model | layout | strategy | "
        + " | ".join(k for k in F.CATEGORIES.values())
        + " | total | seconds |",
        "|---|---|---|" + "---:|" * (len(F.CATEGORIES) + 2),
    ]
    for case, rep in results:
        peak = rep["peak"]
        cells = " | ".join(gib(peak[k]) for k in F.CATEGORIES.values())
        lines.append(
            f"| {case.model} | {case.label} | {case.strategy} | {cells} | {gib(peak['total'])} "
            f"| {rep['seconds']:.0f} |"
        )
    lines += ["", NOTES]
    return "\n".join(lines) + "\n"


NOTES = """\
What the rows show:

- params, grads, buffers: equal to the byte. Parameters and gradients are FSDP2's padded dim-0
  shards (of the TP-local shapes under TP); the buffers are every block's RoPE cos / sin tables.
- optimizer: AdamW's moments equal to the byte; the tracker also files AdamW's 0-d fp32 `step`
  counters (one per parameter tensor) as optimizer state, which the prediction prices apart
  (peak.predict_peak's `step_counters`): the named term.
- activations: what the forward leaves saved equals the prediction less the int64 token ids and
  targets (16 B per token, saved by the embedding and the loss), which the tracker files under
  inputs, plus the 4 B loss.
- peak: predict_peak's phases. Exact where the binding moment is the start of backward without
  TP (8B under FSDP 8). Full recomputation's `recompute` phase is an upper bound by construction
  (every gradient counted while a block recomputes). 70B under FSDP 8: the tracker's peak falls
  inside backward, which the phases leave out (peak.UNMODELLED['fsdp']): a block's gathered bf16
  parameters beside the prefetched next block and the fp32 reduce-scatter input of its
  gradients, with most activations still alive; a 70B block is large enough for this to outgrow
  the logits' transient at backward start. Under TP the tracker's peak holds more bytes filed as
  activations than the forward saved (8B, FSDP 4 x TP 2: 10.47 against 8.26 GiB): the backward of
  loss_parallel's vocab-parallel cross-entropy allocates more than the prediction's two fp32
  (s, v / tp) buffers. These peak residuals are reported, not named to the byte.
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=sorted({c.model for c in CASES}))
    ap.add_argument("--out", default=OUT, help="the Markdown table (default: %(default)s)")
    args = ap.parse_args(argv)
    # DTensor's note that clipping over the 2-D mesh takes two all-reduces: fake, not our concern
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    results = []
    for case in CASES:
        if case.model not in args.models:
            continue
        rep = run(case)
        print(f"{case.model} {case.label} {case.strategy}: {rep['seconds']:.0f} s", flush=True)
        results.append((case, rep))
    text = table(results, time.perf_counter() - t0)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
