"""The Plan: what a recomputation strategy did to a model, as every other layer reads it (by field,
never by
strategy name). Layer: config (typed objects passed between layers; no torch).
recompute_lab.strategies makes
Plans; recompute_lab.predict, measure, run and the record read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Plan:
    """What a strategy did to a model, as every other component reads it.

    recomputed        qualified names of modules whose forward reruns in backward (block groups:
                      every block)
    saved             what stays saved for backward, in words or module names
    block_groups      whole-block checkpoint regions as lists of block indices (layers, sqrt,
                      regions, ...)
    activation_reason why recompute_lab.predict.theory has no closed form for this plan (None: the
    module
                      formula applies)
    flops_reason      why the module FLOP formula cannot predict the recompute FLOPs (None: it can)
    predicted_activation_bytes  the strategy's own prediction where theory has none (budget's probed
                                cost model)
    predicted_largest_region    with it: the bytes the largest recompute region re-saves while
                                it reruns in backward (the peak's recompute phase; 0: none reruns)
    details           strategy-specific figures (save_ops, chosen options, ...), merged into
                      results.json
    """

    name: str
    description: str
    recomputed: list[str] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    block_groups: Optional[list[list[int]]] = None
    activation_reason: Optional[str] = None
    flops_reason: Optional[str] = None
    predicted_activation_bytes: Optional[int] = None
    predicted_largest_region: Optional[int] = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    offload: bool = False
    offload_effective: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The ``strategy`` section of results.json."""
        out: dict[str, Any] = {
            "name": self.name,
            "recomputed": list(self.recomputed),
            "saved": list(self.saved),
            "description": self.description,
        }
        if self.block_groups is not None:
            out["regions"] = [list(g) for g in self.block_groups]
        out.update(self.details)
        if self.predicted_activation_bytes is not None:
            out["predicted_activation_bytes"] = self.predicted_activation_bytes
        if self.predicted_largest_region is not None:
            out["predicted_largest_region_bytes"] = self.predicted_largest_region
        out.update(
            notes=list(self.notes),
            offload=self.offload,
            offload_effective=self.offload_effective,
            warnings=list(self.warnings),
        )
        return out
