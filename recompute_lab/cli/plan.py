"""The advisor: ``recompute-lab-plan model=llama3_8b data.seq_len=8192 plan.gpus=8
plan.gpu=h100_80gb`` (or ``python -m recompute_lab.plan ...``) ranks every layout x strategy x
micro-batch for that cluster by predicted tokens/s, those that fit the card after its reserve
first, and exports the winner as our estimate command, a torchtitan TOML fragment and Megatron-LM
arguments.

A Hydra app over the training config tree (conf/plan.yaml = conf/config.yaml + ``plan.*`` of
recompute_lab.config.PlanConfig; precision defaults to bf16_master). Memory per GPU is
recompute_lab.predict.per_gpu's (the numbers ``estimate`` prints for the same layout), time
recompute_lab.predict.step_time's; the ranking is recompute_lab.predict.advisor. Writes plan.json
(plan.out) in the run's output dir.

Layer: cli.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from recompute_lab.cli import app
from recompute_lab.config import CONF_DIR, ConfigError
from recompute_lab.config.spec import RunSpec

log = logging.getLogger("recompute_lab.cli.plan")  # not __name__: "__main__" under python -m


def plan(cfg: DictConfig) -> dict:
    """The ranked candidates for ``cfg`` (a composed config) and the winner's exports."""
    from recompute_lab.predict import advisor, devices, step_time

    opts = cfg.plan
    spec = RunSpec.of(cfg)
    precision = str(spec.precision.name)
    if precision not in ("bf16_master", "fp32"):
        raise ConfigError(
            f"plan: precision={precision} has no per-GPU model; use bf16_master or fp32"
        )
    devices.card(str(opts.gpu))  # unknown presets: the error names the valid ones
    step_time.rates_of(str(opts.gpu))
    if int(opts.gpus) < 1 or (opts.global_batch is not None and int(opts.global_batch) < 1):
        raise ConfigError("plan.gpus and plan.global_batch must be positive integers")
    seq = int(spec.data.seq_len)
    model = spec.model
    if seq > int(model.max_seq_len) and str(model.positions) != "learned":
        import dataclasses

        model = dataclasses.replace(model, max_seq_len=seq)  # RoPE tables grow with the sequence
    res = advisor.advise(
        model,
        seq,
        int(opts.gpus),
        str(opts.gpu),
        opts.global_batch,
        [int(b) for b in opts.micro_batches],
        [str(s) for s in opts.strategies],
        int(opts.max_pp),
        precision,
    )
    if not res["rows"]:
        raise ConfigError(
            f"no layout of {opts.gpus} GPUs divides this model and batch (global batch "
            f"{res['global_batch']}, micro-batches {list(opts.micro_batches)}): change plan.gpus "
            "or plan.global_batch"
        )
    best = res["rows"][0]
    res["model"] = spec.model.name
    res["exports"] = (
        advisor.export(best, spec.model.name, seq, res["global_batch"], precision, str(opts.gpu))
        if best["fits"]
        else None
    )
    return res


def report(res: dict, top: int, explain) -> str:
    from recompute_lab.predict import advisor

    lines = advisor.format_rows(res, top)
    if explain is not None:
        i = int(explain)
        if not 1 <= i <= len(res["rows"]):
            raise ConfigError(f"plan.explain={i}: rows are numbered 1 to {len(res['rows'])}")
        lines += [f"row {i}:", *advisor.explain(res["rows"][i - 1])]
    ex = res["exports"]
    if ex is None:
        lines.append("nothing fits: more GPUs, a shorter sequence or a larger card")
    else:
        lines += [
            "the winner (row 1):",
            *advisor.explain(res["rows"][0]),
            "  recompute_lab: " + ex["recompute_lab"],
            "  torchtitan TOML:",
            *("    " + x for x in ex["torchtitan_toml"].splitlines()),
            "  Megatron-LM: " + ex["megatron_args"],
            *("  note: " + n for n in ex["notes"]),
        ]
    lines.append(
        "time: recompute_lab/predict/step_time.py (datasheet rates x efficiencies, not yet "
        "calibrated on these cards); memory: the per-GPU peak estimate prints"
    )
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="plan")
def main(cfg: DictConfig) -> float | None:
    """One ranking per job: the table on stdout, plan.json (plan.out) in the job's output dir."""
    from recompute_lab.record.logs import route_warnings
    from recompute_lab.record.results import write_json_atomic

    route_warnings()
    t0 = time.perf_counter()
    try:
        res = plan(cfg)
        text = report(res, int(cfg.plan.top), cfg.plan.explain)
    except ConfigError as e:
        log.error("plan: invalid configuration: %s", e)
        sys.exit(2)
    res["elapsed_s"] = time.perf_counter() - t0
    print(text)
    out = Path(HydraConfig.get().runtime.output_dir) / cfg.plan.out
    write_json_atomic(out, res)
    log.info("wrote %s (%.1f s)", out, res["elapsed_s"])
    return res["rows"][0]["tokens_per_s"]


def cli() -> None:
    """``python -m recompute_lab.plan`` (and the ``recompute-lab-plan`` console script)."""
    app.launch(main, "plan", root_keys=("plan",))


if __name__ == "__main__":
    cli()
