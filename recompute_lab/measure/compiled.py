"""torch.compile as an axis: compile a model after its recomputation strategy, and measure what the
compiled
graphs save, recompute and cost.

Compiling changes what is saved for backward. AOTAutograd traces forward and backward as one joint
graph and its
min-cut partitioner (torch._functorch.partitioners.min_cut_rematerialization_partition) chooses
which forward
values the backward graph receives and which it recomputes from them; cheap pointwise ops are
recomputed on its
own, and ``torch._functorch.config.activation_memory_budget`` (< 1) turns the choice into a knapsack
over graph
nodes (saved bytes within the budget fraction, least recompute runtime by its FLOP estimate).
Checkpoint regions
of the strategy (torch.utils.checkpoint, SAC) are traced as such and their nodes are forced to
recompute.

``Session`` builds one backend per run (``compile.backend``: aot_eager_decomp_partition or inductor,
the budget
patched in while the backend partitions) and compiles each model of the run with it
(``compile.scope``: every
block, or the whole model). One backend object for every model of the run means one compile per
distinct graph:
the probe's model compiles, the training model reuses the cached code (dynamo guards on shapes, not
identities).

Under the eager-kernel backend the partitioned graphs are recorded (``Pair``: the forward and
backward FX graphs
of one compile, which forward inputs are parameters, how often the forward ran), so the run can say,
from the
graphs alone and independently of any run-time hook:
  saved bytes     the backward graph's inputs that are neither gradients (tangents) nor parameters,
                  storages once
  FLOPs           FlopCounterMode's formulas applied to each node's fake values (nothing runs); a
                  backward node
                  that depends on no tangent is forward work rerun in backward: its FLOPs are the
                  recompute FLOPs
Inductor compiles the graphs into its own kernels; there they are not recorded and the run says so.

What measurement paths do under compilation (recompute_lab.measure.probe): saved_tensors_hooks see
the compiled
autograd function's saved tensors at run time, but only a pack hook dynamo does not trace
(``count_saved``:
``torch._dynamo.disable``); module hooks and TorchDispatchModes (attribution by module, MemTracker)
would make
dynamo recompile the graph under them or run eagerly, so they are not run on compiled models.

Layer: measure.
"""

from __future__ import annotations

import functools
import operator
import time
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any, Callable, Optional

import torch
from torch import fx, nn

from recompute_lab.config import CompileBackend, CompileScope, ConfigError
from recompute_lab.measure.memory import storage_key

# FLOP formulas for the CPU flash-attention kernels (FlopCounterMode knows only the CUDA ones): the
# same formula.
from recompute_lab.strategies.budget.probe import CPU_SDPA_FLOPS

INDUCTOR_FLOPS_REASON = (
    "compile.backend=inductor: the partitioned graphs become Inductor kernels and are not "
    "recorded; the same min-cut partition is counted under compile=eager_partition"
)


@dataclass
class Pair:
    """The forward and backward graphs of one compile, as the partitioner split them."""

    forward: fx.GraphModule
    backward: fx.GraphModule
    params: list[
        bool
    ]  # per forward input (primals_1, primals_2, ...): a parameter or buffer of the model
    calls: int = 0  # forward runs since the last ``Recorder.reset``

    def saved(self) -> list[dict]:
        """The backward graph's saved inputs: placeholders that are no tangent and no parameter, one
        per storage."""
        out: dict[int, dict] = {}
        for n in self.backward.graph.nodes:
            if n.op != "placeholder" or n.name.startswith("tangents"):
                continue
            if n.name.startswith("primals_") and self.params[int(n.name.split("_")[1]) - 1]:
                continue
            v = n.meta.get("val")
            if isinstance(v, torch.Tensor):
                st = (
                    v.untyped_storage()
                )  # fake storages: views of one tensor share one, as at run time
                out.setdefault(
                    st._cdata,
                    {
                        "name": n.name,
                        "nbytes": _concrete(st.nbytes()),
                        "shape": [_concrete(d) for d in v.shape],
                        "dtype": str(v.dtype).replace("torch.", ""),
                    },
                )
        return list(out.values())

    def saved_bytes(self) -> int:
        return sum(s["nbytes"] for s in self.saved())


@dataclass
class Recorder:
    """Every graph pair the run's backend partitioned, in compile order."""

    pairs: list[Pair] = field(default_factory=list)
    state: set = field(
        default_factory=set
    )  # storage keys of the compiled models' parameters and buffers
    backend_s: float = (
        0.0  # time inside the backend: tracing forward + backward, partitioning, compiling
    )

    def reset(self) -> None:
        for p in self.pairs:
            p.calls = 0

    @property
    def calls(self) -> int:
        return sum(p.calls for p in self.pairs)


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _counting(fn: Callable, pair_ref: dict) -> Callable:
    """``fn`` (a boxed compiled forward) that counts its calls on the pair it belongs to."""

    def call(*args):
        pair_ref["pair"].calls += 1
        return fn(*args)

    call._boxed_call = getattr(
        fn, "_boxed_call", False
    )  # aot_autograd calls boxed functions with one list
    return call


def _inductor_decompositions() -> dict:
    return import_module("torch._inductor.compile_fx").select_decomp_table()


def make_backend(backend: str, memory_budget: Optional[float], recorder: Recorder) -> Callable:
    """A torch.compile backend: ``backend`` with ``activation_memory_budget`` patched in while it
    partitions.

    aot_eager_decomp_partition is rebuilt here (as torch._dynamo.backends.debugging defines it:
    Inductor's
    decompositions, the min-cut partitioner in its Inductor mode, no-op compilers) so the graphs can
    be recorded.
    """
    from torch._functorch import config as functorch_config

    patch = {} if memory_budget is None else {"activation_memory_budget": float(memory_budget)}

    def eager_partition(gm: fx.GraphModule, example_inputs: list) -> Callable:
        from torch._dynamo.backends.common import aot_autograd
        from torch._dynamo.backends.debugging import get_nop_func
        from torch._functorch.partitioners import min_cut_rematerialization_partition

        # Dynamo lifts parameters and buffers to graph inputs (real tensors here): primals_k is the
        # k-th input.
        params = [
            isinstance(x, nn.Parameter)
            or (
                isinstance(x, torch.Tensor) and not _is_fake(x) and storage_key(x) in recorder.state
            )
            for x in example_inputs
        ]
        ref: dict[str, Any] = {}

        def partition(joint, joint_inputs, **kw):
            fw, bw = min_cut_rematerialization_partition(
                joint, joint_inputs, compiler="inductor", **kw
            )
            ref["pair"] = Pair(fw, bw, params)
            recorder.pairs.append(ref["pair"])
            return fw, bw

        nop = get_nop_func()
        with functorch_config.patch({"unlift_effect_tokens": True, **patch}):
            return aot_autograd(
                fw_compiler=lambda g, ins: _counting(nop(g, ins), ref),
                bw_compiler=nop,
                decompositions=_inductor_decompositions,
                partition_fn=partition,
            )(gm, example_inputs)

    def inductor(gm: fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        with functorch_config.patch(patch):
            return compile_fx(gm, example_inputs)

    inner = {
        CompileBackend.aot_eager_decomp_partition.value: eager_partition,
        CompileBackend.inductor.value: inductor,
    }.get(str(backend))
    if inner is None:
        raise ConfigError(
            f"compile.backend={backend!r} compiles nothing here; valid: "
            f"{', '.join(b.value for b in CompileBackend if b != CompileBackend.off)}"
        )

    @functools.wraps(inner)
    def timed(gm: fx.GraphModule, example_inputs: list) -> Callable:
        t0 = time.perf_counter()
        try:
            return inner(gm, example_inputs)
        finally:
            recorder.backend_s += time.perf_counter() - t0

    return timed


class Session:
    """The run's compilation: one backend (and graph recorder) shared by every model the run
    compiles."""

    def __init__(self, ccfg: Any):
        # a run starts from an empty compile cache: its compile time and graphs are its own
        torch._dynamo.reset()
        self.backend = str(ccfg.backend)
        self.scope = str(ccfg.scope)
        self.memory_budget = None if ccfg.memory_budget is None else float(ccfg.memory_budget)
        self.recorder = Recorder()
        self.compiler = make_backend(self.backend, self.memory_budget, self.recorder)
        self.first_step_s: Optional[float] = (
            None  # wall time of the first compiled forward + backward
        )
        self.first_step_where: Optional[str] = None

    @property
    def records_graphs(self) -> bool:
        return self.backend == CompileBackend.aot_eager_decomp_partition

    def apply(self, model: nn.Module) -> nn.Module:
        """Compile ``model`` in place (nn.Module.compile: parameter names and state_dict keys
        unchanged)."""
        self.recorder.state |= {storage_key(t) for t in (*model.parameters(), *model.buffers())}
        if self.scope == CompileScope.model:
            model.compile(backend=self.compiler)
        elif self.scope == CompileScope.block:
            for block in model.blocks:
                block.compile(backend=self.compiler)
        else:
            raise ConfigError(
                f"compile.scope={self.scope!r}; valid: {', '.join(s.value for s in CompileScope)}"
            )
        return model

    def first_step(self, step: Callable[[], Any], where: str) -> Any:
        """Run ``step`` (forward + backward), timing it as the compile step if no compiled step ran
        before."""
        t0 = time.perf_counter()
        out = step()
        if self.first_step_s is None:
            self.first_step_s, self.first_step_where = time.perf_counter() - t0, where
        return out

    def describe(self) -> dict:
        """The ``compile`` section of results.json, before engine.compile_step adds what it
        measured."""
        return {
            "backend": self.backend,
            "scope": self.scope,
            "memory_budget": self.memory_budget,
            "partitioner_default_budget": _default_budget(),
            "graphs": len(self.recorder.pairs),
            "backend_s": self.recorder.backend_s,
        }


def _default_budget() -> float:
    from torch._functorch import config as functorch_config

    return float(functorch_config.activation_memory_budget)


def count_saved(model: nn.Module, forward: Callable[[], Any]) -> dict:
    """Bytes autograd keeps for backward after ``forward()`` runs a compiled ``model``: a
    saved_tensors_hooks pack
    hook that dynamo does not trace, storages counted once, parameters and buffers excluded, saves
    whose tensor died
    before the forward ended left out (as recompute_lab.measure.memory.saved_tensors, without its
    module hooks and
    dispatch mode, which would make dynamo recompile). Returns total, by dtype, the tensors and the
    output."""
    import weakref

    exclude = {storage_key(t) for t in (*model.parameters(), *model.buffers())}
    saved: dict[tuple, dict] = {}

    @torch._dynamo.disable
    def pack(t: torch.Tensor) -> torch.Tensor:
        # not t: a saved output would hold its own grad_fn (see
        # recompute_lab.measure.memory.saved_tensors)
        held = t.detach()
        k = storage_key(t)
        if k not in exclude and (k not in saved or saved[k]["ref"]() is None):
            saved[k] = {
                "ref": weakref.ref(held),
                "nbytes": t.untyped_storage().nbytes(),
                "shape": list(t.shape),
                "dtype": str(t.dtype).replace("torch.", ""),
            }
        return held

    with torch.autograd.graph.saved_tensors_hooks(pack, torch._dynamo.disable(lambda t: t)):
        output = forward()
    live = [e for e in saved.values() if e["ref"]() is not None]
    by_dtype: dict[str, int] = {}
    for e in live:
        by_dtype[e["dtype"]] = by_dtype.get(e["dtype"], 0) + e["nbytes"]
    return {
        "total": sum(by_dtype.values()),
        "by_dtype": by_dtype,
        "tensors": [{k: v for k, v in e.items() if k != "ref"} for e in live],
        "output": output,
    }


def _concrete(v: Any) -> int:
    """An int from a size that may be symbolic (e.g. the CPU RNG state a checkpoint saves): its
    hint."""
    from torch.fx.experimental.symbolic_shapes import optimization_hint

    return int(optimization_hint(v)) if isinstance(v, torch.SymInt) else int(v)


def _node_flops(n: fx.Node) -> int:
    """FLOPs of one call_function node by FlopCounterMode's formulas, from its inputs' and output's
    fake values
    (nothing runs). The RNG wrappers AOTAutograd puts around ops that may draw random numbers (SDPA
    has a dropout
    argument), run_and_save_rng_state(op, *args) -> (state, out) and run_with_rng_state(state, op,
    *args) -> out,
    are priced as the op they wrap."""
    from torch.utils.flop_counter import flop_registry

    target, args, out = n.target, n.args, n.meta.get("val")
    wrapped = [i for i, a in enumerate(args) if isinstance(a, torch._ops.OpOverload)]
    if not isinstance(target, torch._ops.OpOverload) and wrapped:
        target, args = args[wrapped[0]], args[wrapped[0] + 1 :]
        if (
            str(n.target) == "run_and_save_rng_state"
        ):  # (state, out); its value may be unset: formulas use inputs
            out = None if out is None else out[1]
    packet = getattr(target, "overloadpacket", None)
    formula = CPU_SDPA_FLOPS.get(packet) or flop_registry.get(packet)
    if formula is None:
        return 0  # pointwise ops, views, reductions: no FLOP formula (as FlopCounterMode counts)

    def val(a: Any) -> Any:
        return a.meta.get("val") if isinstance(a, fx.Node) else a

    return _concrete(
        formula(
            *fx.node.map_aggregate(args, val), **fx.node.map_aggregate(n.kwargs, val), out_val=out
        )
    )


def graph_flops(gm: fx.GraphModule) -> dict:
    """FLOPs of one run of ``gm``: total, and those of nodes that depend on no tangent (in a
    backward graph: the
    forward ops it recomputes; every node of a forward graph)."""
    downstream: set[fx.Node] = set()  # nodes that depend on a tangent: the gradient computation
    total = rerun = ops = 0
    for n in gm.graph.nodes:
        if (n.op == "placeholder" and n.name.startswith("tangents")) or any(
            a in downstream for a in n.all_input_nodes
        ):
            downstream.add(n)
        if n.op != "call_function":
            continue
        spent = _node_flops(n)
        total += spent
        if n not in downstream:
            rerun += spent
            # a forward op duplicated in backward (tuple unpacking and views, which compute nothing,
            # aside)
            ops += not (n.target is operator.getitem or getattr(n.target, "is_view", False))
    return {"total": total, "recompute": rerun, "recompute_ops": ops}


def graph_measurements(recorder: Recorder) -> dict:
    """Per forward run (each pair weighted by its calls since the last reset): saved bytes, forward,
    backward and
    recomputed FLOPs of the compiled graphs."""
    out = {
        "saved_bytes": 0,
        "forward": 0,
        "backward": 0,
        "recompute": 0,
        "calls": recorder.calls,
        "pairs": [],
    }
    for p in recorder.pairs:
        if not p.calls:
            continue
        fw, bw = graph_flops(p.forward), graph_flops(p.backward)
        row = {
            "calls": p.calls,
            "saved_bytes": p.saved_bytes(),
            "forward": fw["total"],
            "backward": bw["total"],
            "recompute": bw["recompute"],
            "recompute_ops": bw["recompute_ops"],
            "saved": len(p.saved()),
        }
        out["pairs"].append(row)
        for k in ("saved_bytes", "forward", "backward", "recompute"):
            out[k] += p.calls * row[k]
    return out
