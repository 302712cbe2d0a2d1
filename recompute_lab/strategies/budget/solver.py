"""The budget planner's solver: the cheapest multiset of per-block options whose saved bytes fit a
budget.

Cost per option: ``objective=flops`` -> (recompute FLOPs, pointwise bytes) compared
lexicographically;
``objective=time`` -> FLOPs / peak FLOP/s + pointwise bytes / memory bandwidth (a roofline,
recompute_lab.measure.hardware).
A dynamic programme over the L blocks keeps, for each number of blocks planned, the Pareto set of
(activation bytes, cost) over all multisets of options; the answer is the cheapest point within the
budget. This
is exact for the cost model (a brute force over every per-block assignment agrees,
tests/integration/test_budget.py).

Layer: strategies.
"""

from __future__ import annotations

from typing import Optional

from recompute_lab.strategies.budget.probe import Price


def cost_key(price: Price, objective: str, rates: Optional[dict]) -> tuple:
    """What the solver minimises for one option (tuples add elementwise and compare
    lexicographically)."""
    if objective == "time":
        return (price.flops / rates["flops"] + price.pointwise_bytes / rates["bytes_per_s"],)
    return (price.flops, price.pointwise_bytes)


def _add(a: tuple, b: tuple) -> tuple:
    return tuple(x + y for x, y in zip(a, b))


def _adder(n: int):
    """Elementwise addition of two n-tuples (cost keys have one or two terms)."""
    if n == 1:
        return lambda a, b: (a[0] + b[0],)
    if n == 2:
        return lambda a, b: (a[0] + b[0], a[1] + b[1])
    return _add


def undominated(sizes: list[int], costs: list[tuple]) -> list[int]:
    """Indices of the options no other option beats on bytes and cost (ties: the first listed). A
    dominated
    option is never needed: swapping it for its dominator keeps a plan within budget at no higher
    cost."""
    keep = []
    for o in sorted(range(len(sizes)), key=lambda o: (sizes[o], costs[o], o)):
        if not keep or costs[o] < costs[keep[-1]]:
            keep.append(o)
    return keep


def pareto_plans(
    n_layer: int, sizes: list[int], costs: list[tuple]
) -> list[tuple[int, tuple, tuple[int, ...]]]:
    """Exact DP over blocks: [(block bytes, cost, option counts)] for every Pareto-optimal multiset
    of n_layer
    options, by bytes ascending and cost strictly descending. Dominated partial plans can always be
    swapped for
    their dominator (bytes and cost are both additive), so pruning them after each block loses
    nothing."""
    # Each layer's frontier point: (bytes, cost, index of its parent in the previous frontier,
    # option added). Costs are 1- or 2-tuples (cost_key), added in a specialised expression: the
    # generic elementwise add was most of a plan's time (~2M calls for the 8B layout question).
    add = _adder(len(costs[0]))
    layers = [[(0, tuple(0 for _ in costs[0]), -1, -1)]]
    options = list(enumerate(zip(sizes, costs)))
    for _ in range(n_layer):
        cand = [
            (b + size, add(c, cost), i, o)
            for i, (b, c, _, _) in enumerate(layers[-1])
            for o, (size, cost) in options
        ]
        # by (bytes, cost), ties in the order generated (parent, then option): the whole tuple's
        # order, since (i, o) rise in generation order
        cand.sort()
        frontier = []
        best = None
        for point in cand:
            if best is None or point[1] < best:
                frontier.append(point)
                best = point[1]
        layers.append(frontier)
    out = []
    for b, c, parent, o in layers[-1]:
        counts = [0] * len(sizes)
        for depth in range(n_layer, 0, -1):  # walk the parents back to the first block
            counts[o] += 1
            _, _, parent, o = layers[depth - 1][parent] if depth > 1 else (0, 0, -1, -1)
        out.append((b, c, tuple(counts)))
    return out


def cheapest_within(frontier: list, capacity: int) -> Optional[tuple]:
    fitting = [p for p in frontier if p[0] <= capacity]
    return fitting[-1] if fitting else None  # costs fall as bytes rise along the frontier
