"""Build (or update) a W&B comparison workspace for recompute_lab runs:
``recompute-lab-dashboard --entity E --project P [--group G] [--sweep-dir DIR]``.

The workspace (wandb-workspaces, ``pip install 'recompute_lab[dashboard]'``) groups runs by the axes
a sweep varies
(``--sweep-dir``: read from its jobs' .hydra/overrides.yaml; ``--groupby``: given; default strategy
x precision x
model) and shows: peak memory and activation bytes, model-state bytes per parameter, FLOPs and
recompute overhead,
step time and tokens/s, MFU / HFU, loss, gradient-norm and per-step memory curves,
memory-vs-overhead scatters
(each run one point) and the runs side by side. Failed runs (oom, diverged: W&B state "failed") are
kept: in a
memory study they are results; only the sweeps' analysis runs are filtered out. ``--group`` keeps
only the runs of
one sweep (W&B group = the sweep folder's name, e.g. 2026-11-29_01-02-03).

Saving again updates the same workspace view in place: its internal name is derived from entity,
project, group
and name, so a rerun finds it (or pass ``--url`` of a workspace to update). It needs the online W&B
API; runs
logged offline must be uploaded first with ``wandb sync <run dir>/wandb/offline-run-*``.
``--dry-run`` prints the workspace it would create (sections, panels, metrics, grouping, filters)
without the API or a key.

Layer: cli.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import typing
from pathlib import Path
from typing import Optional

from recompute_lab.config import GROUPS
from recompute_lab.record.wandb_run import has_credentials

GROUP_BY = ("strategy.name", "precision.name", "model.name")


def axis_key(override_key: str) -> Optional[str]:
    """The W&B config key a Hydra override varies: ``+strategy`` -> ``strategy.name``, ``data`` ->
    ``data.kind``,
    ``data.seq_len`` -> ``data.seq_len``; None for what is no run setting (hydra.*, experiment,
    local, logger)."""
    key = override_key.lstrip("+~")
    root = key.split(".")[0].split("/")[0]
    if root in ("hydra", "experiment", "local", "logger"):
        return None
    groups = GROUPS
    if "." not in key and root in groups:  # a group choice: the field naming the chosen option
        fields = typing.get_type_hints(groups[root])
        return f"{root}.name" if "name" in fields else f"{root}.kind"
    return key


def swept_axes(sweep_dir: Path) -> list[str]:
    """Config keys whose override differs between the jobs of a Hydra multirun folder, in
    command-line order."""
    import yaml

    values: dict[str, set] = {}
    for path in sorted(Path(sweep_dir).glob("*/.hydra/overrides.yaml")):
        try:
            items = yaml.safe_load(path.read_text()) or []
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ValueError(f"{path}: not a Hydra overrides list ({type(e).__name__})") from None
        if not isinstance(items, list):
            raise ValueError(f"{path}: not a Hydra overrides list (a {type(items).__name__})")
        for item in items:
            key, _, value = str(item).partition("=")
            values.setdefault(key, set()).add(value)
    axes = [axis_key(k) for k, v in values.items() if len(v) > 1]
    return list(dict.fromkeys(a for a in axes if a))


def view_name(entity: str, project: str, group: Optional[str], name: str) -> str:
    """A stable internal view name (W&B's "nw-<id>-v" form), so that saving again updates the same
    view."""
    n = int(hashlib.sha256(f"{entity}/{project}/{group or ''}/{name}".encode()).hexdigest(), 16)
    digits = ""
    for _ in range(11):  # 11 base-36 characters, as W&B's own generated view ids
        n, r = divmod(n, 36)
        digits += "0123456789abcdefghijklmnopqrstuvwxyz"[r]
    return f"nw-{digits}-v"


def build_workspace(
    entity: str,
    project: str,
    group: Optional[str] = None,
    name: Optional[str] = None,
    axes: typing.Sequence[str] = GROUP_BY,
):
    """The workspace spec (nothing is sent until .save()): runs grouped by ``axes`` (config keys),
    every panel
    following that grouping."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def bars(title: str, metric: str) -> "wr.BarPlot":
        return wr.BarPlot(
            title=title,
            metrics=[metric],
            groupby_aggfunc="mean",
            groupby_rangefunc="minmax",
            orientation="h",
        )

    def lines(title: str, metric: str) -> "wr.LinePlot":
        return wr.LinePlot(title=title, x="Step", y=[metric])

    memory = ws.Section(
        name="Memory (bytes)",
        is_open=True,
        panels=[
            bars("Peak memory (measured)", "memory/peak_bytes/measured"),
            bars(
                "Activation bytes saved for backward (measured)", "memory/activation_bytes/measured"
            ),
            bars("Activation bytes (predicted)", "memory/activation_bytes/predicted"),
            bars(
                "Model state bytes per parameter",
                "memory/model_state_bytes/bytes_per_param/measured",
            ),
        ],
    )
    compute = ws.Section(
        name="Compute and time",
        is_open=True,
        panels=[
            bars("Recompute FLOPs / (forward + backward)", "flops/recompute_overhead"),
            bars("Recompute FLOPs per step", "flops/per_step/recompute"),
            bars("Median step time (s)", "time/step_s_median"),
            bars("Tokens per second", "time/tokens_per_s"),
            bars("MFU", "flops/mfu"),
            bars("HFU", "flops/hfu"),
        ],
    )
    tradeoff = ws.Section(
        name="Memory vs overhead",
        is_open=True,
        panels=[
            wr.ScatterPlot(
                title="Activation bytes vs recompute FLOP overhead",
                x=wr.SummaryMetric("flops/recompute_overhead"),
                y=wr.SummaryMetric("memory/activation_bytes/measured"),
            ),
            wr.ScatterPlot(
                title="Activation bytes vs median step time",
                x=wr.SummaryMetric("time/step_s_median"),
                y=wr.SummaryMetric("memory/activation_bytes/measured"),
            ),
        ],
    )
    training = ws.Section(
        name="Training",
        is_open=True,
        panels=[
            lines("Loss", "loss"),
            lines("Gradient norm", "grad_norm"),
            lines("Tokens per second", "tokens_per_s"),
            lines("CUDA memory allocated (bytes)", "memory/allocated_bytes"),
            lines("Resident set size, CPU runs (bytes)", "memory/rss_bytes"),
        ],
    )
    runs = ws.Section(
        name="Runs side by side (status, error, config)",
        is_open=False,
        panels=[wr.RunComparer(diff_only="split")],
    )
    # No State filter: oom / diverged runs end "failed" in W&B and belong in a memory study. The
    # sweep's analysis
    # run (job_type analysis, same group) is not a training run.
    filters = [ws.Metric("JobType") == "train"]
    if group:
        filters.append(ws.Metric("Group") == group)
    name = name or f"recompute_lab{' ' + group if group else ''}"
    spec = ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        sections=[memory, compute, tradeoff, training, runs],
        runset_settings=ws.RunsetSettings(
            filters=filters,
            groupby=[ws.Config(k) for k in axes],
            pinned_columns=["summary:status", "summary:error", "summary:loss/final"],
        ),
    )
    spec._internal_name = view_name(entity, project, group, name)
    return spec


def _filters(spec) -> str:
    found = getattr(spec.runset_settings, "filters", None)
    if isinstance(found, (list, tuple)):
        return "; ".join(str(f) for f in found)
    return str(found)  # wandb-workspaces keeps them as one expression


def describe(spec, axes: typing.Sequence[str]) -> list[str]:
    """What ``spec`` would create, without the W&B API: the workspace, its run filter and
    grouping, and every section's panels with the metrics they plot (``--dry-run``)."""
    lines = [
        f"workspace {spec.name!r} in {spec.entity}/{spec.project} (view {spec._internal_name}), "
        f"runs grouped by {', '.join(axes)}",
        f"  filters: {_filters(spec)}",
    ]
    for section in spec.sections:
        lines.append(f"  section {section.name!r}:")
        for panel in section.panels:
            title = getattr(panel, "title", None) or type(panel).__name__
            found = [getattr(panel, k, None) for k in ("metrics", "x", "y")]
            metrics = []
            for m in found:  # a list of names, one name, or a SummaryMetric
                for one in m if isinstance(m, (list, tuple)) else [m]:
                    if one is not None and not (isinstance(one, str) and one == "Step"):
                        metrics.append(str(getattr(one, "name", one)))
            shown = ", ".join(dict.fromkeys(metrics))
            lines.append(f"    {type(panel).__name__}: {title}" + (f" [{shown}]" if shown else ""))
    return lines


def reuse_existing(spec) -> bool:
    """Point ``spec`` at the saved view of the same internal name, if there is one (then .save()
    updates it)."""
    import wandb_workspaces.workspaces.internal as internal

    try:
        found = internal.get_view_dict(spec.entity, spec.project, spec._internal_name)
    except ValueError:  # no such view yet
        return False
    spec._internal_id = found["id"]
    return True


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="recompute-lab-dashboard", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--entity", required=True, help="W&B entity (user or team)")
    ap.add_argument("--project", required=True, help="W&B project the runs were logged to")
    ap.add_argument("--group", default=None, help="only the runs of this W&B group (one sweep)")
    ap.add_argument("--name", default=None, help="workspace name (default: recompute_lab [GROUP])")
    ap.add_argument(
        "--sweep-dir",
        type=Path,
        default=None,
        help="a multirun folder: group the runs by the axes its jobs vary",
    )
    ap.add_argument(
        "--groupby",
        default=None,
        help=f"comma-separated config keys to group by (default: {','.join(GROUP_BY)})",
    )
    ap.add_argument("--url", default=None, help="update this existing workspace instead")
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="print the workspace that would be created (no W&B API, no key needed) and exit",
    )
    args = ap.parse_args(argv)
    axes = GROUP_BY
    if args.groupby:
        axes = tuple(k.strip() for k in args.groupby.split(",") if k.strip())
    elif args.sweep_dir is not None:
        if not args.sweep_dir.is_dir():
            print(
                f"recompute-lab-dashboard: --sweep-dir {args.sweep_dir} is not a folder",
                file=sys.stderr,
            )
            return 2
        try:
            axes = tuple(swept_axes(args.sweep_dir)) or GROUP_BY
        except ValueError as e:
            print(f"recompute-lab-dashboard: {e}", file=sys.stderr)
            return 2
    try:
        spec = build_workspace(args.entity, args.project, args.group, args.name, axes)
    except ImportError:
        print(
            "recompute_lab.cli.dashboard needs wandb-workspaces: pip install "
            "'recompute_lab[dashboard]'",
            file=sys.stderr,
        )
        return 2
    if args.dry_run:
        print("\n".join(describe(spec, axes)))
        print("dry run: nothing was sent to W&B")
        return 0
    if not has_credentials():
        print(
            "recompute_lab.cli.dashboard needs the online W&B API, and no API key is set.\n"
            "  1. wandb login   (or export WANDB_API_KEY=...)\n"
            "  2. upload offline runs: wandb sync outputs/*/*/wandb/offline-run-* "
            "multirun/*/*/*/wandb/offline-run-*\n"
            f"  3. rerun: recompute-lab-dashboard --entity {args.entity} --project {args.project}",
            file=sys.stderr,
        )
        return 2
    try:
        if args.url:
            import wandb_workspaces.workspaces as ws

            old = ws.Workspace.from_url(args.url)
            spec._internal_name, spec._internal_id = old._internal_name, old._internal_id
            updated = True
        else:
            updated = reuse_existing(spec)
        saved = spec.save()
    except Exception as e:
        print(
            f"recompute_lab.cli.dashboard: W&B refused the workspace ({type(e).__name__}: {e})",
            file=sys.stderr,
        )
        return 1
    print(
        f"workspace {'updated' if updated else 'saved'}: {saved.url} (grouped by {', '.join(axes)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
