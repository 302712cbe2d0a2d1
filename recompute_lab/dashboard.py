"""Build a W&B comparison workspace for recompute_lab runs:
``python -m recompute_lab.dashboard --entity E --project P``.

The workspace (wandb-workspaces, ``pip install 'recompute_lab[dashboard]'``) groups runs by strategy x precision
and shows: peak memory and activation bytes, model-state bytes per parameter, FLOPs and recompute overhead,
step time and tokens/s, MFU / HFU, loss curves, and a memory-vs-overhead scatter (each run one point). ``--group``
keeps only the runs of one sweep (W&B group = the sweep folder's name). It needs the online W&B API; runs logged
offline must be uploaded first with ``wandb sync <run dir>/wandb/offline-run-*``.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from recompute_lab.wandb_logger import has_credentials

GROUP_BY = ("strategy.name", "precision.name")


def build_workspace(entity: str, project: str, group: Optional[str] = None, name: Optional[str] = None):
    """The workspace spec (nothing is sent until .save())."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def bars(title: str, metric: str) -> "wr.BarPlot":
        return wr.BarPlot(title=title, metrics=[metric], groupby="strategy.name", groupby_aggfunc="mean",
                          groupby_rangefunc="minmax", orientation="h")

    memory = ws.Section(name="Memory (bytes)", is_open=True, panels=[
        bars("Peak memory (measured)", "memory/peak_bytes/measured"),
        bars("Activation bytes saved for backward (measured)", "memory/activation_bytes/measured"),
        bars("Activation bytes (predicted)", "memory/activation_bytes/predicted"),
        bars("Model state bytes per parameter", "memory/model_state_bytes/bytes_per_param/measured"),
    ])
    compute = ws.Section(name="Compute and time", is_open=True, panels=[
        bars("Recompute FLOPs / (forward + backward)", "flops/recompute_overhead"),
        bars("Recompute FLOPs per step", "flops/per_step/recompute"),
        bars("Median step time (s)", "time/step_s_median"),
        bars("Tokens per second", "time/tokens_per_s"),
        bars("MFU", "flops/mfu"),
        bars("HFU", "flops/hfu"),
    ])
    training = ws.Section(name="Training", is_open=True, panels=[
        wr.LinePlot(title="Loss", x="Step", y=["loss"], groupby="strategy.name"),
        wr.LinePlot(title="Tokens per second", x="Step", y=["tokens_per_s"], groupby="strategy.name"),
    ])
    tradeoff = ws.Section(name="Memory vs overhead", is_open=True, panels=[
        wr.ScatterPlot(title="Activation bytes vs recompute FLOP overhead",
                       x=wr.SummaryMetric("flops/recompute_overhead"),
                       y=wr.SummaryMetric("memory/activation_bytes/measured")),
        wr.ScatterPlot(title="Activation bytes vs median step time",
                       x=wr.SummaryMetric("time/step_s_median"),
                       y=wr.SummaryMetric("memory/activation_bytes/measured")),
    ])
    filters = [ws.Metric("State") == "finished"]
    if group:
        filters.append(ws.Metric("Group") == group)
    return ws.Workspace(
        entity=entity, project=project, name=name or f"recompute_lab{' ' + group if group else ''}",
        sections=[memory, compute, tradeoff, training],
        runset_settings=ws.RunsetSettings(filters=filters, groupby=[ws.Config(k) for k in GROUP_BY]),
    )


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m recompute_lab.dashboard", description=__doc__.splitlines()[0])
    ap.add_argument("--entity", required=True, help="W&B entity (user or team)")
    ap.add_argument("--project", required=True, help="W&B project the runs were logged to")
    ap.add_argument("--group", default=None, help="only the runs of this W&B group (one sweep)")
    ap.add_argument("--name", default=None, help="workspace name")
    args = ap.parse_args(argv)
    try:
        spec = build_workspace(args.entity, args.project, args.group, args.name)
    except ImportError:
        print("recompute_lab.dashboard needs wandb-workspaces: pip install 'recompute_lab[dashboard]'", file=sys.stderr)
        return 2
    if not has_credentials():
        print("recompute_lab.dashboard needs the online W&B API, and no API key is set.\n"
              "  1. wandb login   (or export WANDB_API_KEY=...)\n"
              "  2. upload offline runs: wandb sync outputs/*/*/wandb/offline-run-* "
              "multirun/*/*/*/wandb/offline-run-*\n"
              f"  3. rerun: python -m recompute_lab.dashboard --entity {args.entity} --project {args.project}",
              file=sys.stderr)
        return 2
    try:
        saved = spec.save()
    except Exception as e:
        print(f"recompute_lab.dashboard: W&B refused the workspace ({type(e).__name__}: {e})", file=sys.stderr)
        return 1
    print(f"workspace saved: {saved.url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
