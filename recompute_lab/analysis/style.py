"""One figure style for every analysis figure: paper sizes, >= 9 pt text, greyscale-safe marks, byte
units.

Sizes are for a two-column paper: ``ONE_COLUMN`` (3.5 in) and ``TWO_COLUMN`` (7.2 in) wide; figures
are drawn at
print size so the font sizes below are what the reader sees. Every distinction is carried by a
marker, line style
or hatch; colour (Okabe-Ito, colour-blind safe) only repeats it.

Layer: analysis (no torch).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

ONE_COLUMN = 3.5
TWO_COLUMN = 7.2
MIN_FONT = 9
MARKERS = "osD^vP*Xh<>"
HATCHES = ("", "//", "xx", "..", "\\\\", "oo", "++")
# Okabe & Ito (2008) colour-blind-safe palette; fills that stay distinct in greyscale come from the
# hatches.
COLORS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
LINESTYLES = ("-", "--", ":", "-.")
BYTE_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))

RC = {
    "font.size": MIN_FONT,
    "axes.titlesize": 10,
    "axes.labelsize": MIN_FONT,
    "xtick.labelsize": MIN_FONT,
    "ytick.labelsize": MIN_FONT,
    "legend.fontsize": MIN_FONT,
    "figure.titlesize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "savefig.dpi": 150,
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "text.color": "black",
    "axes.labelcolor": "black",
    "xtick.color": "black",
    "ytick.color": "black",
    "legend.framealpha": 0.9,
}


def apply() -> None:
    plt.rcParams.update(RC)


def figure(ncols: int = 1, width: float = TWO_COLUMN, height: float = 3.0, **kw):
    """A figure at print size (``width`` inches; ONE_COLUMN or TWO_COLUMN) with constrained
    layout."""
    apply()
    return plt.subplots(1, ncols, figsize=(width, height), layout="constrained", **kw)


def byte_unit(max_bytes: float) -> tuple[str, int]:
    """The largest binary unit in which ``max_bytes`` is at least 1 (KiB, MiB, GiB)."""
    for unit, div in BYTE_UNITS:
        if max_bytes >= div:
            return unit, div
    return "B", 1


def plain_log_axis(axis) -> None:
    """Log axis ticks as plain numbers (3, 10, 30), not 2^k or 10^k."""
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def few_ticks(axis, n: int = 4) -> None:
    axis.set_major_locator(MaxNLocator(n))


def wrap(text: str, width: int = 28) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


# One colour and one marker per strategy, used by every figure (and by experiments/what_fits.py):
# a strategy looks the same wherever it appears. Keys are strategy labels
# (aggregate.strategy_label); a label not listed takes its base name's style ("layers(...)" ->
# "layers"), a strategy not listed at all one of EXTRA in a fixed order of first use. Colours: the
# Okabe-Ito palette, then Tol's wine, teal and grey; no two strategies share a colour or a marker.
STRATEGY_STYLE = {
    "none": ("#000000", "o"),
    "full": ("#0072B2", "s"),
    "selective": ("#E69F00", "D"),  # selective's default modules: [core_attn]
    "selective[core_attn]": ("#E69F00", "D"),
    "selective[attn]": ("#D55E00", "^"),
    "selective[mlp]": ("#CC79A7", "v"),
    "selective[norm]": ("#B8A800", "P"),
    "layers": ("#009E73", "X"),
    "sqrt": ("#56B4E9", "*"),
    "op": ("#882255", "h"),
    "regions": ("#44AA99", "<"),
    "offload": ("#999999", ">"),
    "budget": ("#332288", "p"),
}
EXTRA = (("#117733", "d"), ("#AA4499", "H"), ("#DDCC77", "8"), ("#661100", "1"))
_extra_used: dict[str, tuple[str, str]] = {}


def strategy_style(label: str) -> tuple[str, str]:
    """(colour, marker) of a strategy label: the same in every figure."""
    label = str(label)
    if label in STRATEGY_STYLE:
        return STRATEGY_STYLE[label]
    base = label.split("(")[0].split("[")[0]
    if base in STRATEGY_STYLE:
        return STRATEGY_STYLE[base]
    if label not in _extra_used:
        _extra_used[label] = EXTRA[len(_extra_used) % len(EXTRA)]
    return _extra_used[label]


def short_label(label: str) -> str:
    """A legend name: 'layers(method=block,num_layers=1)' -> 'layers(block, 1)'."""
    label = str(label)
    if "(" not in label:
        return label
    base, _, args = label.partition("(")
    vals = [a.split("=", 1)[-1] for a in args.rstrip(")").split(",")]
    return f"{base}({', '.join(vals)})"


def where(rows) -> str:
    """'tiny on cpu (x86_64, 1 thread)': the model(s) and device(s) of ``rows``, for a figure title
    (every figure names both)."""
    models = sorted({str(r["model"]) for r in rows if r.get("model")})
    devs = sorted({str(r["device"]) for r in rows if r.get("device")})
    return f"{', '.join(models) or 'model n/a'} on {', '.join(devs) or 'device n/a'}"
