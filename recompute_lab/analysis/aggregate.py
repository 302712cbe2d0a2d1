"""Load every results.json under a sweep folder into one flat row per run, and pair runs with their
baseline.

A run's *baseline* is the `none` run (nothing recomputed) whose resolved config is identical except
for the
strategy (and settings that do not change a result: logger, progress bar, resume/checkpoint options,
the
overhead measurement's settings). Against it a row gets its activation saving (1 - saved bytes /
baseline's
saved bytes). Its time overhead is NOT taken from two runs' step times (two separate runs of one
config differed
by -92% to +461% on a shared CPU): it is the run's own paired measurement, results.json
``time.overhead``
(recompute_lab.measure.overhead: ratio of the median of interleaved rounds against the baseline
strategy, with a 95%
interval), read into time_overhead and time_overhead_ci_low/high (ratio - 1). Runs whose times were
contended (a
parallel launcher's jobs side by side) keep their overhead out of these columns and say so in
``note``. Failed
runs (status oom, diverged, interrupted, error) and unreadable files keep a row with their status;
their numbers
are None, printed as n/a.

Only results.json is read (the contract of recompute_lab.record.results, schema_version 1). Keys
written by the memory
probe (memory.activation_bytes.*, memory.peak_bytes.*) may be absent in older runs: their columns
are then None,
and :func:`missing_keys` says which runs lack what, so figures and quiz can say so instead of
guessing.

Layer: analysis (no torch).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Optional

from recompute_lab.config.strategies import label_of
from recompute_lab.record.folder import fallback_path, is_locked
from recompute_lab.record.result import RecordError, RunResult
from recompute_lab.predict.theory import korthikanti_layer_bytes, naive_layer_bytes
from recompute_lab.measure.timing import describe, median_ci


class AnalysisError(ValueError):
    """The folder cannot be analysed (does not exist, holds no results.json)."""


# Config keys that do not change what a run measures: ignored when matching a run to its baseline.
IGNORED_FOR_MATCH = (
    "strategy",
    "logger",
    "trainer.progress",
    "trainer.resume",
    "trainer.checkpoint_every",
    "trainer.memory_snapshot",
    "trainer.overhead",
)
# Columns that depend on wall-clock time: they differ between reruns of the same sweep.
TIMING_COLUMNS = (
    "step_s_median",
    "step_s_p90",
    "step_s_min",
    "tokens_per_s",
    "time_overhead",
    "time_overhead_ci_low",
    "time_overhead_ci_high",
    "time_rounds",
    "time_baseline_step_s",
    "time_overhead_rep",
    "time_overhead_rep_low",
    "time_overhead_rep_high",
    "replicates",
    "tokens_per_s_ci_low",
    "tokens_per_s_ci_high",
    "tokens_per_s_rep",
    "tokens_per_s_rep_low",
    "tokens_per_s_rep_high",
    "mfu",
    "hfu",
)
COLUMNS = (
    "run",
    "status",
    "device",
    "model",
    "precision",
    "strategy",
    "attention",
    "seq_len",
    "batch_size",
    "n_layer",
    "d_model",
    "n_head",
    "vocab_size",
    "params",
    "act_bytes_predicted",
    "act_bytes_measured",
    "logits_bytes",
    "peak_bytes_predicted",
    "peak_bytes_measured",
    "peak_source",
    "peak_phase_predicted",
    "model_state_bytes",
    "bytes_per_param_measured",
    "bytes_per_param_predicted",
    "ms_params",
    "ms_grads",
    "ms_master",
    "ms_optimizer",
    "flops_forward",
    "flops_backward",
    "flops_recompute",
    "flop_overhead",
    "step_s_median",
    "step_s_p90",
    "step_s_min",
    "tokens_per_s",
    "tokens_per_s_ci_low",
    "tokens_per_s_ci_high",
    "mfu",
    "hfu",
    "final_loss",
    "baseline",
    "act_saved_bytes",
    "act_saved_frac",
    "time_baseline",
    "time_overhead",
    "time_overhead_ci_low",
    "time_overhead_ci_high",
    "time_rounds",
    "time_baseline_step_s",
    "replicates",
    "time_overhead_rep",
    "time_overhead_rep_low",
    "time_overhead_rep_high",
    "tokens_per_s_rep",
    "tokens_per_s_rep_low",
    "tokens_per_s_rep_high",
    "time_contended",
    "note",
    "error",
)
OK = "ok"


def _get(d: Any, path: str) -> Any:
    """``d['a']['b']`` for path 'a.b'; None where any level is missing or not a dict."""
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def find_results(folder: Path) -> list[Path]:
    """Every results.json under ``folder`` (itself included), sorted; a clear error when there is
    none."""
    folder = Path(folder)
    if not folder.exists():
        raise AnalysisError(
            f"{folder}: no such folder; pass a sweep folder such as multirun/DATE/TIME "
            "(or a single run's output folder)"
        )
    if not folder.is_dir():
        raise AnalysisError(
            f"{folder}: not a folder; pass the folder that holds the runs' results.json files"
        )
    paths = sorted(p for p in folder.rglob("results.json") if p.is_file())
    if not paths:
        raise AnalysisError(
            f"{folder}: no results.json found under it; a sweep folder holds one run folder per "
            "job, each with a results.json (python -m recompute_lab.train -m ...)"
        )
    return paths


def strategy_label(strategy_cfg: Optional[dict]) -> str:
    """A short readable name: 'none', 'full', 'selective[core_attn]',
    'layers(method=block,num_layers=1)'
    (the strategy's own label rule, recompute_lab.config.strategies.label_of)."""
    return label_of(strategy_cfg)


def precision_label(precision_cfg: Optional[dict]) -> Optional[str]:
    if not isinstance(precision_cfg, dict):
        return None
    name = precision_cfg.get("name")
    return f"{name}+fp32_grad_accum" if precision_cfg.get("fp32_grad_accum") else name


def match_key(config: Optional[dict], also_ignore: tuple[str, ...] = ()) -> str:
    """The resolved config minus the strategy, result-neutral settings and ``also_ignore``, as
    canonical JSON."""
    c = copy.deepcopy(config) if isinstance(config, dict) else {}
    for path in IGNORED_FOR_MATCH + also_ignore:
        *parents, leaf = path.split(".")
        node = c
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return json.dumps(c, sort_keys=True, default=str)


# Columns that hold text; every other column is a number (or None).
TEXT_COLUMNS = (
    "run",
    "status",
    "device",
    "model",
    "precision",
    "strategy",
    "attention",
    "peak_source",
    "peak_phase_predicted",
    "baseline",
    "note",
    "error",
)


# Numeric columns where a non-finite value is a result (a diverged run's loss); in every other
# one it reads as missing.
INFINITE_OK = ("final_loss",)


def _dict(v: Any) -> dict:
    return v if isinstance(v, dict) else {}


def _clean(obj: Any) -> Any:
    """JSON as the writer (or another tool) left it, made safe to compute with: the writer's "inf" /
    "-inf"
    strings become floats, NaN becomes None, containers are walked."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    if isinstance(obj, str) and obj.lower() in ("inf", "+inf", "infinity", "-inf", "-infinity"):
        return float(obj.replace("inity", ""))
    if isinstance(obj, str) and obj.lower() == "nan" or (isinstance(obj, float) and obj != obj):
        return None
    return obj


def _coerce(row: dict) -> dict:
    """Numbers where numbers belong, text where text belongs; anything else (a list, a dict, a bool)
    is None."""
    for col in COLUMNS:
        v = row.get(col)
        if col in TEXT_COLUMNS:
            row[col] = (
                v
                if v is None or isinstance(v, str)
                else (str(v) if isinstance(v, (int, float)) else None)
            )
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            row[col] = None
        elif not math.isfinite(v) and col not in INFINITE_OK:
            # "inf" bytes, FLOPs or times are no measurement: missing, not a point off every axis
            row[col] = None
    return row


def row_of(res: dict, run: str, folder: Optional[Path] = None) -> dict:
    """One flat row from one results.json (every column present, None where the run did not measure
    it).

    Tolerant of every value the writer can produce and of foreign JSON: wrong types read as missing.
    A
    ``running`` record whose run folder (``folder``) no live process holds is reported as
    ``killed``.
    """
    res = _clean(res)
    cfg = _dict(res.get("config"))
    mem, fl, t = _dict(res.get("memory")), _dict(res.get("flops")), _dict(res.get("time"))
    ms = _dict(mem.get("model_state_bytes"))
    per_kind = _dict(ms.get("per_param"))
    ps = _dict(fl.get("per_step"))
    model = _dict(res.get("model"))
    status = res.get("status") if isinstance(res.get("status"), str) else "unknown"
    error = res.get("error") or None
    if status == "running" and folder is not None and not is_locked(folder):
        status, error = (
            "killed",
            "no process holds the run folder: the job died without its final record",
        )
    row = dict.fromkeys(COLUMNS)
    row.update(
        run=run,
        status=status,
        error=error,
        device=device_label(_dict(res.get("env"))),
        model=_get(cfg, "model.name"),
        precision=precision_label(cfg.get("precision")),
        strategy=strategy_label(cfg.get("strategy")),
        attention=_get(cfg, "model.attention"),
        seq_len=model.get("seq_len", _get(cfg, "data.seq_len")),
        batch_size=model.get("batch_size", _get(cfg, "data.batch_size")),
        n_layer=_get(cfg, "model.n_layer"),
        d_model=_get(cfg, "model.d_model"),
        n_head=_get(cfg, "model.n_head"),
        vocab_size=_get(cfg, "model.vocab_size"),
        params=model.get("params"),
        act_bytes_predicted=_get(mem, "activation_bytes.predicted"),
        act_bytes_measured=_get(mem, "activation_bytes.measured"),
        logits_bytes=_get(mem, "activation_bytes.logits.measured"),
        peak_bytes_predicted=_get(mem, "peak_bytes.predicted"),
        peak_bytes_measured=_get(mem, "peak_bytes.measured"),
        peak_source=_get(mem, "peak_bytes.source"),
        peak_phase_predicted=_get(mem, "peak_bytes.predicted_parts.phase"),
        model_state_bytes=ms.get("measured"),
        bytes_per_param_measured=_get(ms, "bytes_per_param.measured"),
        bytes_per_param_predicted=_get(ms, "bytes_per_param.predicted"),
        ms_params=per_kind.get("params"),
        ms_grads=per_kind.get("grads"),
        ms_master=per_kind.get("master"),
        ms_optimizer=per_kind.get("optimizer"),
        flops_forward=ps.get("forward"),
        flops_backward=ps.get("backward"),
        flops_recompute=ps.get("recompute"),
        flop_overhead=fl.get("recompute_overhead"),
        mfu=fl.get("mfu"),
        hfu=fl.get("hfu"),
        step_s_median=t.get("step_s_median"),
        step_s_p90=t.get("step_s_p90"),
        tokens_per_s=t.get("tokens_per_s"),
        final_loss=_get(res, "loss.final"),
        step_s_min=_fastest_step(t),
    )
    _coerce(row)
    within_run_throughput(row, t)
    # what the step figures draw (not table columns): the measured peak by category and after
    # forward (mem_tracker), the predicted bytes by phase, the loss per step
    row["_peak_by_category"] = _num_dict(_get(mem, "peak_bytes.mem_tracker.by_category"))
    row["_after_forward"] = _num_dict(_get(mem, "peak_bytes.mem_tracker.after_forward"))
    row["_phases_predicted"] = _num_dict(_get(mem, "peak_bytes.predicted_parts.phases"))
    hist = _get(res, "loss.history")
    row["_loss_history"] = (
        [x if _is_num(x) else None for x in hist] if isinstance(hist, list) else []
    )
    if row["error"]:
        row["error"] = str(row["error"]).splitlines()[0][:200]
    plan = _dict(res.get("strategy"))
    # offload on a device whose "host" is itself (CPU) moves nothing; the saved-tensor count may
    # read 0 there.
    row["_offload_noop"] = bool(plan.get("offload")) and plan.get("offload_effective") is False
    if row["_offload_noop"]:
        row["note"] = "offload moves nothing on this device: activation saving not counted"
    paired_overhead(row, t)
    row["_key"] = match_key(cfg)
    # Runs that differ only in sequence length (figure 1's series) / only in precision (figure 2's
    # bars).
    row["_series_key"] = match_key(cfg, ("data.seq_len", "model.max_seq_len"))
    row["_precision_key"] = match_key(cfg, ("precision",))
    row["_strategy_name"] = _dict(cfg.get("strategy")).get("name", "none")
    row["_strategy_cfg"] = _dict(cfg.get("strategy")) or {"name": "none"}
    return row


def device_label(env: dict) -> Optional[str]:
    """Where a run ran, for titles: 'cpu (x86_64, 1 thread)', 'cuda (NVIDIA H100 80GB HBM3)'."""
    dev = env.get("device")
    if not isinstance(dev, str):
        return None
    extra = [str(env["device_name"])] if isinstance(env.get("device_name"), str) else []
    n = env.get("num_threads")
    if dev == "cpu" and isinstance(n, int) and not isinstance(n, bool):
        extra.append(f"{n} thread" + ("s" if n != 1 else ""))
    return f"{dev} ({', '.join(extra)})" if extra else dev


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num_dict(d: Any) -> dict:
    return {str(k): v for k, v in d.items() if _is_num(v)} if isinstance(d, dict) else {}


def _timed_steps(t: dict) -> list[float]:
    raw = t.get("step_s") if isinstance(t.get("step_s"), list) else []
    steps = [x for x in raw if _is_num(x)]
    warm = t.get("warmup_steps") if isinstance(t.get("warmup_steps"), int) else 0
    return steps[warm:] or steps


def within_run_throughput(row: dict, t: dict) -> None:
    """tokens_per_s_ci_low/high: tokens per step over the order-statistic 95% interval of the
    median timed step (recompute_lab.measure.timing.median_ci): the within-run interval of one
    run's throughput (None with fewer than 6 timed steps)."""
    per_step = t.get("tokens_per_step")
    steps = [x for x in _timed_steps(t) if x > 0]
    if not _is_num(per_step) or not steps:
        return
    _, lo, hi = median_ci(steps)
    if lo is not None and hi is not None:
        row["tokens_per_s_ci_low"], row["tokens_per_s_ci_high"] = per_step / hi, per_step / lo


# Two-sided 95% quantiles of Student's t with df = 1..30 degrees of freedom (any statistics
# table); past 30, 1.96 + 2.4 / df is within 0.01 of the exact value.
# fmt: off
T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)
# fmt: on


def t975(df: int) -> float:
    return T975[df - 1] if df <= len(T975) else 1.96 + 2.4 / df


def prediction_interval(values: list[float]) -> tuple[float, Optional[float], Optional[float]]:
    """(centre, low, high) of positive ``values`` (one per replicate process), on the log scale:
    the geometric mean and the 95% prediction interval for ONE more replicate,
    exp(m +- t_{n-1} s sqrt(1 + 1/n)) with m, s the mean and standard deviation of the logs. It
    says where a fresh rerun's value lands (a confidence interval of the mean would be narrower by
    sqrt(n + 1) and would not). Fewer than two values: no interval."""
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"prediction_interval needs positive values, got {values}")
    logs = [math.log(v) for v in values]
    n = len(logs)
    m = sum(logs) / n
    if n < 2:
        return math.exp(m), None, None
    sd = math.sqrt(sum((x - m) ** 2 for x in logs) / (n - 1))
    half = t975(n - 1) * sd * math.sqrt(1 + 1 / n)
    return math.exp(m), math.exp(m - half), math.exp(m + half)


def replicate_intervals(rows: list[dict]) -> None:
    """The between-replicate columns: runs with the same config and strategy (the same
    ``_key`` and strategy label; experiments/reproduce_figures.py runs timed sweeps in several
    processes) are replicates. Each gets ``replicates`` (how many have a paired time overhead
    against the same baseline), ``time_overhead_rep`` with ``_low/_high`` (geometric mean of the
    replicates' ratios and its 95% prediction interval, as ratio - 1) and ``tokens_per_s_rep``
    with ``_low/_high`` (the same for tokens/s). The within-run interval (time_overhead_ci_*,
    tokens_per_s_ci_*) covers the noise of one process only; this one covers reruns."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == OK and r.get("_key") is not None and not r.get("time_contended"):
            groups.setdefault((r["_key"], r["strategy"]), []).append(r)
    for members in groups.values():
        timed = [r for r in members if r["time_overhead"] is not None]
        baselines = {r.get("time_baseline") for r in timed}
        if len(timed) >= 2 and len(baselines) == 1:
            c, lo, hi = prediction_interval([1 + r["time_overhead"] for r in timed])
            for r in members:
                r.update(
                    replicates=len(timed),
                    time_overhead_rep=c - 1,
                    time_overhead_rep_low=lo - 1,
                    time_overhead_rep_high=hi - 1,
                )
        tps = [r["tokens_per_s"] for r in members if r["tokens_per_s"]]
        if len(tps) >= 2:
            c, lo, hi = prediction_interval(tps)
            for r in members:
                r.update(tokens_per_s_rep=c, tokens_per_s_rep_low=lo, tokens_per_s_rep_high=hi)
                r["replicates"] = r.get("replicates") or len(tps)


def _fastest_step(t: dict) -> Optional[float]:
    """The fastest timed step (warmup steps left out). On a machine shared with other processes the
    median
    absorbs their bursts; the fastest step is the least disturbed estimate of the step's own cost
    (timeit's rule)."""
    steps = [
        x
        for x in (t.get("step_s") if isinstance(t.get("step_s"), list) else [])
        if isinstance(x, (int, float)) and not isinstance(x, bool)
    ]
    warm = t.get("warmup_steps") if isinstance(t.get("warmup_steps"), int) else 0
    timed = steps[warm:] or steps
    return min(timed) if timed else None


def paired_overhead(row: dict, t: dict) -> None:
    """The run's own paired time overhead (results.json time.overhead) as ratio - 1 with its
    interval; kept out
    (None, with a note) when the run's times were contended or the measurement was skipped."""
    o = t.get("overhead") or {}
    row["time_baseline"] = o.get("baseline")
    if t.get("contended"):
        row["time_contended"] = t.get("contended_reason") or "contended"
        row["note"] = _join(row.get("note"), f"time not used: {row['time_contended']}")
        return
    if o.get("skipped"):
        row["note"] = _join(row.get("note"), f"no paired time overhead: {o['skipped']}")
    if o.get("ratio") is None:
        return
    row.update(
        time_overhead=o["ratio"] - 1.0,
        time_rounds=o.get("rounds"),
        time_baseline_step_s=o.get("baseline_step_s"),
        time_overhead_ci_low=None if o.get("ci95_low") is None else o["ci95_low"] - 1.0,
        time_overhead_ci_high=None if o.get("ci95_high") is None else o["ci95_high"] - 1.0,
    )


def _join(a: Optional[str], b: str) -> str:
    return b if not a else f"{a}; {b}"


def fmt_rep_overhead(r: dict) -> str:
    """A row's between-replicate time overhead: '+30.4% (95% PI +20.1% to +41.0%, 3 processes)';
    'n/a' without replicates. PI: the prediction interval for one more rerun
    (:func:`prediction_interval`); 'contains 0' is said, never hidden."""
    o = r.get("time_overhead_rep")
    if o is None:
        return "n/a"
    lo, hi = r["time_overhead_rep_low"], r["time_overhead_rep_high"]
    if lo == hi == o == 0:
        return "+0.0% (by definition)"
    zero = "; contains 0" if lo <= 0 <= hi else ""
    return (
        f"{100 * o:+.1f}% (95% PI {100 * lo:+.1f}% to {100 * hi:+.1f}%, "
        f"{r['replicates']} processes{zero})"
    )


def fmt_overhead(r: dict) -> str:
    """A row's paired time overhead in words (recompute_lab.measure.timing.describe): an interval
    that contains 0 is
    'within noise (+-x%)', never a finding."""
    o = r.get("time_overhead")
    if o is None:
        return "n/a"
    lo, hi = r.get("time_overhead_ci_low"), r.get("time_overhead_ci_high")
    return describe(1 + o, None if lo is None else 1 + lo, None if hi is None else 1 + hi)


def load_rows(folder: Path) -> list[dict]:
    """Rows for every results.json under ``folder``, sorted, each paired with its baseline where one
    exists."""
    folder = Path(folder)
    rows = []
    for path in find_results(folder):
        run = str(path.parent.relative_to(folder)) if path.parent != folder else "."
        try:
            # the typed contract (recompute_lab.record.result); a damaged section reads as empty
            res = RunResult.load(path, lenient=True).to_dict()
            spare = fallback_path(path.parent)
            if res.get("status") == "running" and spare.is_file() and not is_locked(path.parent):
                # the folder could not take the final record, which went beside it
                # (RunFolder.finish): that one, not the running record, tells how the run ended
                res = RunResult.load(spare, lenient=True).to_dict()
            rows.append(row_of(res, run, path.parent))
        except (RecordError, RecursionError) as e:
            # one bad record (not a record, nested past Python's recursion limit) costs only its
            # row: kept visible as unreadable rather than silently dropped
            if isinstance(e, RecursionError):
                e = RecordError(f"{path}: nested too deeply to read (RecursionError)")
            row = dict.fromkeys(COLUMNS)
            row.update(
                run=run,
                status="unreadable",
                error=f"{type(e).__name__}: {e}"[:200],
                _key=None,
                _strategy_name=None,
                _strategy_cfg=None,
            )
            rows.append(row)
    rows.sort(key=_sort_key)
    pair_with_baselines(rows)
    replicate_intervals(rows)
    return rows


def _sort_key(r: dict) -> tuple:
    return tuple(
        "" if r.get(k) is None else str(r.get(k)) for k in ("model", "precision", "attention")
    ) + (
        r.get("seq_len") or 0,
        r.get("batch_size") or 0,
        r.get("strategy") != "none",
        str(r.get("strategy")),
        r["run"],
    )


def pair_with_baselines(rows: list[dict]) -> None:
    """Fill baseline and act_saved_bytes/frac from the matching successful `none` run (time
    overheads are the runs'
    own paired measurements, read by row_of)."""
    baselines: dict[str, dict] = {}
    for r in rows:  # rows are sorted: the first matching `none` run wins
        if r.get("_strategy_name") == "none" and r["status"] == OK and r["_key"] not in baselines:
            baselines[r["_key"]] = r
    for r in rows:
        b = baselines.get(r.get("_key"))
        if b is None or r["status"] != OK:
            continue
        r["baseline"] = b["run"]
        a, a0 = r["act_bytes_measured"], b["act_bytes_measured"]
        if a is not None and a0 and not r.get("_offload_noop"):
            r["act_saved_bytes"] = a0 - a
            r["act_saved_frac"] = (a0 - a) / a0


def missing_keys(rows: list[dict], columns: tuple[str, ...]) -> dict[str, list[str]]:
    """For each column, the successful runs that lack it (empty lists dropped)."""
    out = {c: [r["run"] for r in rows if r["status"] == OK and r.get(c) is None] for c in columns}
    return {c: runs for c, runs in out.items() if runs}


def ok_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == OK]


def group_key(r: dict) -> tuple:
    """Runs that differ only in strategy: (model, precision, attention, seq_len, batch) to show,
    then the exact
    config key (other settings, e.g. n_layer or steps, may differ between sweeps of one folder)."""
    return (
        r["model"],
        r["precision"],
        r["attention"],
        r["seq_len"],
        r["batch_size"],
        r.get("_key"),
    )


def write_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow(["" if r.get(c) is None else _csv_value(r[c], c) for c in COLUMNS])
    Path(path).write_text(buf.getvalue())


# A spreadsheet reads a cell starting with one of these as a formula (OWASP "CSV injection"); run
# names, errors and notes come from records, i.e. from whoever wrote them.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv_value(v: Any, column: str = "") -> str:
    """A cell: floats as repr (exact), numbers as numbers; a text cell that a spreadsheet would
    run as a formula gets a leading ' (shown as text, the formula never evaluated)."""
    if isinstance(v, float):
        return repr(v)
    text = str(v)
    if column in TEXT_COLUMNS and text.startswith(FORMULA_STARTS):
        return "'" + text
    return text


def fmt_bytes(n: Optional[float]) -> str:
    """Binary units, two decimals: '1.50 MiB'. The quiz and the tables quote bytes this way."""
    if n is None:
        return "n/a"
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit, div in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{sign}{n / div:.2f} {unit}"
    return f"{sign}{n:.0f} B"


def fmt_pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}%"


def run_label(run: str) -> str:
    """A short name for a run folder: its Hydra job number, after its sweep folder's name without
    the number
    ("2_fig3_pareto/1_+strategy=full" -> "fig3_pareto/1"); names are cut to 28 characters.
    summary.csv's `run`
    keeps the full folder name."""
    parts = str(run).replace("\\", "/").split("/")
    out = []
    for i, part in enumerate(parts):
        head, _, tail = part.partition("_")
        if head.isdigit() and tail:
            part = head if i == len(parts) - 1 else tail
        out.append(part if len(part) <= 28 else part[:27] + "…")
    return "/".join(out)


def fmt_tokens(r: dict) -> str:
    """Tokens/s: the between-replicate geometric mean with its 95% PI where the run has
    replicates, else the run's own median with its within-run 95% CI (or the bare value)."""
    if r.get("tokens_per_s_rep") is not None:
        return (
            f"{r['tokens_per_s_rep']:,.0f} (95% PI {r['tokens_per_s_rep_low']:,.0f} to "
            f"{r['tokens_per_s_rep_high']:,.0f}, {r['replicates']} processes)"
        )
    if r.get("tokens_per_s") is None:
        return "n/a"
    if r.get("tokens_per_s_ci_low") is None:
        return f"{r['tokens_per_s']:,.0f} (one run)"
    return (
        f"{r['tokens_per_s']:,.0f} (one run; within-run 95% CI {r['tokens_per_s_ci_low']:,.0f} to "
        f"{r['tokens_per_s_ci_high']:,.0f})"
    )


INTERVALS_NOTE = (
    "Two intervals, never mixed: **between replicates** (95% PI) is the prediction interval "
    "for one more rerun, from the same config run in separate processes (geometric mean of the "
    "replicates' ratios, exp(mean +- t(n-1) sd sqrt(1 + 1/n)) of their logs); it is the one "
    "to cite. **Within run** (95% CI) is each run's own paired measurement (results.json "
    "time.overhead: ABBA rounds against its baseline strategy in one process, the order-statistic "
    "interval of the median round ratio); it covers the noise of one process only and is "
    "narrower than what a rerun gives."
)


def write_markdown(rows: list[dict], path: Path) -> None:
    """summary.md: the table a person reads (bytes in binary units, ratios in %)."""
    head = [
        "job",
        "status",
        "model",
        "precision",
        "strategy",
        "attn",
        "seq",
        "act saved (meas.)",
        "act (pred.)",
        "peak (meas.)",
        "peak phase (pred.)",
        "B/param",
        "FLOP overhead",
        "act saving",
        "time overhead, between replicates (95% PI)",
        "time overhead, within run (paired, 95% CI)",
        "tokens/s",
        "final loss",
    ]
    devices = sorted({str(r["device"]) for r in rows if r.get("device")})
    lines = [
        "# Sweep summary",
        "",
        f"{len(rows)} runs, {len(ok_rows(rows))} ok, on {', '.join(devices) or 'n/a'}. Bytes in "
        "binary units; savings and FLOP overheads relative to the `none` run with the same config "
        "(column `baseline` in summary.csv). " + INTERVALS_NOTE + " An interval that contains 0 "
        'reads "within noise" (within run) or "contains 0" (between replicates). Tokens/s: '
        "between replicates where the run has them, else one run's median step with its "
        "within-run interval. Column job: the run folder's Hydra job number(s) (summary.csv "
        "column `run` has the full folder name).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        within = fmt_overhead(r)
        if r.get("time_baseline") and r["time_baseline"] != "none":
            within += f" vs {r['time_baseline']}"
        if r.get("time_contended"):
            within += " (contended)"
        cells = [
            run_label(r["run"]),
            r["status"],
            r["model"],
            r["precision"],
            r["strategy"],
            r["attention"],
            r["seq_len"],
            fmt_bytes(r["act_bytes_measured"]),
            fmt_bytes(r["act_bytes_predicted"]),
            fmt_bytes(r["peak_bytes_measured"]),
            r.get("peak_phase_predicted") or "n/a",
            "n/a"
            if r["bytes_per_param_measured"] is None
            else f"{r['bytes_per_param_measured']:.1f}",
            fmt_pct(r["flop_overhead"]),
            fmt_pct(r["act_saved_frac"]),
            fmt_rep_overhead(r),
            within,
            fmt_tokens(r),
            "n/a" if r["final_loss"] is None else f"{r['final_loss']:.4f}",
        ]
        lines.append(
            "| "
            + " | ".join("n/a" if c is None else str(c).replace("|", "/") for c in cells)
            + " |"
        )
    failed = [r for r in rows if r["status"] != OK]
    if failed:
        lines += ["", "## Runs that did not finish", ""]
        lines += [
            f"- `{r['run']}`: **{r['status']}** — {r['error'] or 'no message'}" for r in failed
        ]
    Path(path).write_text("\n".join(lines) + "\n")


# Reference lines for figure 1 and quiz question 1 (bytes for the whole model's n_layer layers).
def korthikanti_bytes(s: int, b: int, h: int, a: int, n_layer: int) -> int:
    """Korthikanti et al. 2022, eq. 1: sbh(34 + 5as/h) bytes per layer (16-bit values, dropout on) x
    L."""
    return n_layer * korthikanti_layer_bytes(s, b, h, a)


def naive_bytes(s: int, b: int, h: int, n_layer: int) -> int:
    """The seed notebook's line: 2 bytes x 2 x hidden per token per layer, linear in s."""
    return n_layer * naive_layer_bytes(s, b, h)
