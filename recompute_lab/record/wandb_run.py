"""Weights & Biases mirror of a run: config, per-step metrics, the probe's figures, a summary panel,
artifacts;
and the sweep-level analysis run.

W&B never stops training. Modes fall back in order online -> offline -> disabled: online needs
WANDB_API_KEY
(or a netrc login) and a reachable server; offline writes the run under ``<run dir>/wandb`` for a
later
``wandb sync``; if even that fails the run goes on without W&B and results.json says why. Every job
finishes
its W&B run (also on exceptions), so the next job of a Hydra multirun starts a fresh one.

Config: the resolved Hydra config, plus ``git`` (commit, branch, dirty), ``overrides`` (the command
line's Hydra
overrides) and ``choices`` (the option picked in each config group). History, per step: loss, lr,
step time,
tokens/s, gradient norm (when clipping computes it) and memory (CUDA allocated / reserved, CPU
resident set).
Summary, once per run (from results.json; never history, which would make ~100 one-point charts):
model-state
bytes by kind, activation bytes (predicted / measured, and a per-module table), peak bytes, FLOPs
forward /
backward / recompute, recompute overhead, MFU / HFU, step time, and the run's summary as a panel.
Keys use "/"
(``memory/peak_bytes/measured``) so the W&B UI groups them into sections.

A multirun's analysis (recompute_lab.cli.callbacks) becomes one more run of the sweep's group,
job_type
``analysis``: summary.csv as a table, the figures as images, quiz.md as a panel, and all files as an
artifact.

Layer: record.
"""

from __future__ import annotations

import csv
import netrc
import os
import warnings
from pathlib import Path
from typing import Any, Optional


from recompute_lab.config import LoggerConfig, LoggerKind, WandbMode
from recompute_lab.config.spec import RunSpec, plain_config
from recompute_lab.record.provenance import git_info, hydra_overrides

# Summary aggregation per logged metric (define_metric): the best loss, the worst memory and
# gradient norm.
METRIC_SUMMARIES = {
    "loss": "min",
    "step_s": "mean",
    "tokens_per_s": "mean",
    "lr": "last",
    "grad_norm": "max",
    "memory/*": "max",
}


def sweep_group(sweep_dir: str | Path) -> str:
    """The W&B group of a multirun's jobs (and of its analysis run): the sweep folder's last two
    parts, e.g.
    "2026-11-29_01-02-03" for multirun/2026-11-29/01-02-03."""
    return "_".join(Path(sweep_dir).parts[-2:])


def has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def flatten(obj: Any, prefix: str = "", sep: str = "/") -> dict:
    """Nested dicts to {"a/b/c": scalar}; lists and None are left out (W&B summaries want
    scalars)."""
    out: dict = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{sep}{k}" if prefix else str(k), sep))
    elif isinstance(obj, (int, float, str, bool)):
        out[prefix] = obj
    return out


# W&B refuses a tag longer than 64 characters (the run then failed to start: a model name over
# ~57 characters lost the run its W&B record, issue 31 finding 14)
MAX_TAG = 64


def fit_tag(tag: str) -> str:
    """``tag`` within W&B's 64 characters: a longer one keeps its head and a hash of the whole, so
    distinct tags stay distinct."""
    if len(tag) <= MAX_TAG:
        return tag
    import hashlib

    return f"{tag[: MAX_TAG - 9]}~{hashlib.sha1(tag.encode()).hexdigest()[:8]}"


class RunLogger:
    """The W&B run of one job (a no-op for logger=none or mode=disabled)."""

    def __init__(
        self,
        cfg: RunSpec,
        run_dir: Path,
        group: Optional[str] = None,
        job_type: Optional[str] = None,
        config: Optional[dict] = None,
        tags: Optional[list] = None,
    ):
        """``cfg``: a run config (its ``logger`` section decides whether and how to log).
        ``job_type``,
        ``config`` and ``tags`` replace what a training run uses (logger.job_type, the resolved
        config with its
        provenance, the model / precision / strategy / attention tags), e.g. for the sweep's
        analysis run."""
        self.run = None
        self.mode = "disabled"
        self.note: Optional[str] = None
        self.run_dir = Path(run_dir)
        lc = cfg.logger
        if lc.kind == LoggerKind.none or lc.mode == WandbMode.disabled:
            return
        modes = ["online", "offline"] if lc.mode == WandbMode.online else ["offline"]
        if modes[0] == "online" and not has_credentials():
            self._warn(
                "logger.mode=online but no W&B API key (WANDB_API_KEY or wandb login): logging "
                "offline; "
                "upload later with `wandb sync`"
            )
            modes = ["offline"]
        if tags is None:
            tags = list(lc.tags) + [
                f"model:{cfg.model.name}",
                f"precision:{cfg.precision.name}",
                f"strategy:{cfg.strategy.name}",
                f"attention:{cfg.model.attention}",
            ]
        tags = [fit_tag(str(t)) for t in tags]
        if config is None:
            hydra = hydra_overrides()
            config = {
                **plain_config(cfg),
                "git": git_info(),
                "overrides": hydra["task"],
                "choices": hydra["choices"],
            }
        for mode in modes:
            try:
                self.run = self._init(lc, mode, group, tags, job_type or lc.job_type, config)
                self.mode = mode
                break
            except Exception as e:  # W&B must never stop a training run
                self._warn(f"W&B {mode} init failed ({type(e).__name__}: {e})")
                # e.g. wandb-core died during init: without this, W&B's exit hook printed a
                # ConnectionResetError traceback at the end of a run that went on fine
                drop_service()
        if self.run is None:
            self._warn("continuing without W&B; results.json holds the whole record")
            return
        for key, summary in METRIC_SUMMARIES.items():
            self.run.define_metric(key, summary=summary)
        limit = file_size_limit()
        if limit is not None:  # said before the record is written: it lands in results.json
            self._warn(
                f"a file-size limit of {limit:,} bytes is set (ulimit -f): W&B's files stop "
                "growing there and its copy of this run may be cut short; results.json is the "
                "whole record"
            )

    def _init(
        self,
        lc: LoggerConfig,
        mode: str,
        group: Optional[str],
        tags: list[str],
        job_type: str,
        config: dict,
    ):
        import wandb

        # `WANDB_MODE= cmd` means "unset" to a shell user; wandb's settings reject the empty value
        # and the run went on without W&B
        for var in [k for k, v in os.environ.items() if k.startswith("WANDB_") and v == ""]:
            del os.environ[var]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        name = self.run_dir.name if job_type != "analysis" else f"analysis-{lc.group or group}"
        return wandb.init(
            project=lc.project,
            entity=lc.entity,
            group=lc.group or group,
            tags=tags,
            job_type=job_type,
            dir=str(self.run_dir),
            mode=mode,
            config=config,
            name=name,
            reinit="finish_previous",
            settings=wandb.Settings(console="off", init_timeout=60),
        )

    def _warn(self, message: str) -> None:
        self.note = message if self.note is None else f"{self.note}; {message}"
        warnings.warn(message, stacklevel=3)

    def log(self, metrics: dict, step: int) -> None:
        if self.run is None:
            return
        try:
            self.run.log(metrics, step=step)
        except Exception as e:
            self._warn(f"W&B log failed ({e}); dropping W&B for this run")
            self.run = None
            drop_service()

    def summarize(self, results: dict, summary_text: str = "") -> None:
        """Mirror results.json: flat summary, per-module activation table, summary panel,
        artifacts."""
        if self.run is None:
            return
        try:
            import wandb

            summary = flatten(
                {k: results.get(k) for k in ("status", "error", "model", "memory", "flops", "time")}
            )
            summary["loss/final"] = results["loss"]["final"]
            summary["loss/first"] = results["loss"]["first"]
            summary["summary_text"] = summary_text
            # One-off figures are summary values and tables, not history (no one-point charts).
            by_module = (results["memory"].get("activation_bytes") or {}).get("by_module") or {}
            if by_module:
                rows = [
                    [name, int(b)] for name, b in by_module.items() if isinstance(b, (int, float))
                ]
                summary["activation_bytes_by_module"] = wandb.Table(
                    columns=["module", "bytes"], data=rows
                )
            if summary_text:
                summary["run_summary"] = wandb.Html(f"<pre>{_escape(summary_text)}</pre>")
            self.run.summary.update({k: v for k, v in summary.items() if v is not None})
            self._artifacts(wandb)
        except Exception as e:
            self._warn(f"W&B summary failed ({type(e).__name__}: {e})")

    def _artifacts(self, wandb) -> None:
        files = [
            self.run_dir / "results.json",
            *sorted(self.run_dir.glob("*.pickle")),
            *sorted(self.run_dir.glob("*.png")),
        ]
        # a symlink is not the run's file (recompute_lab makes none): its target is never staged
        files = [f for f in files if f.is_file() and not f.is_symlink()]
        if not files:
            return
        art = wandb.Artifact(
            f"results-{self.run.id}",
            type="run-results",
            description="results.json (and memory snapshot / figures) of one recompute_lab run",
        )
        for f in files:
            art.add_file(str(f))
        self.run.log_artifact(art)

    def analysis(self, rows: list[dict], files: list[Path]) -> None:
        """The sweep's analysis (recompute_lab.cli.analyze's rows and files): summary.csv as a
        table, each figure as
        an image, quiz.md as a panel (all summary values), and every file in one artifact."""
        if self.run is None:
            return
        try:
            import wandb

            files = [Path(f) for f in files if Path(f).is_file() and not Path(f).is_symlink()]
            summary: dict = {
                "runs": len(rows),
                "runs_not_ok": sum(r.get("status") != "ok" for r in rows),
            }
            for f in files:
                if f.name == "summary.csv":
                    with open(f, newline="") as fh:
                        table = list(csv.reader(fh))
                    summary["summary_table"] = wandb.Table(columns=table[0], data=table[1:])
                elif f.suffix == ".png":
                    summary[f"figures/{f.stem}"] = wandb.Image(str(f))
                elif f.suffix == ".md" and f.stem == "quiz":
                    summary["quiz"] = wandb.Html(f"<pre>{_escape(f.read_text())}</pre>")
            self.run.summary.update(summary)
            art = wandb.Artifact(
                f"analysis-{self.run.group or self.run.id}".replace("/", "_"),
                type="sweep-analysis",
                description="recompute_lab.cli.analyze of one sweep: summary.csv/md, figures, "
                "quiz.md",
            )
            for f in files:
                art.add_file(str(f))
            self.run.log_artifact(art)
        except Exception as e:
            self._warn(f"W&B analysis run failed ({type(e).__name__}: {e})")

    def finish(self, exit_code: int = 0) -> None:
        if self.run is None:
            return
        try:
            self.run.finish(exit_code=exit_code)
        except Exception as e:
            self._warn(f"W&B finish failed ({e})")
        self.run = None
        limit = file_size_limit()
        if limit is not None:
            for f in sorted(self.run_dir.glob("wandb/*/*.wandb")):
                if f.stat().st_size >= limit and not f.parent.is_symlink():  # not latest-run
                    self._warn(
                        f"W&B's log {f} reached the file-size limit ({limit:,} bytes, ulimit -f): "
                        "its copy of this run is cut short; results.json is the whole record"
                    )


def drop_service() -> None:
    """Tear down W&B's service connection after it failed (wandb-core killed or gone), so that its
    atexit hook does not print a traceback at exit for a run that already ended well; the next
    W&B run of this process starts a new service."""
    try:
        import wandb

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wandb.teardown()
    except BaseException:  # a broken connection raises on the way out; nothing is left to save
        pass


def file_size_limit() -> Optional[int]:
    """This process's file-size limit in bytes (ulimit -f), None when there is none."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    except (ImportError, OSError, ValueError):  # no resource module (Windows)
        return None
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
