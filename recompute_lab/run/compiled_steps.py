"""What a training run does when ``compile.backend`` is set (recompute_lab.run.engine calls these):
the run's compile
session, the compiled model's first forward + backward outside the timed loop (graphs measured,
gradients checked
against eager ``none`` on the same weights and batch), and the recompute FLOPs read from the
partitioned backward
graphs. The compile mechanics themselves (backend, graph recorder, saved-byte counts) are
recompute_lab.measure.compiled.

Layer: run."""

from __future__ import annotations

from typing import Optional

import torch

from recompute_lab.measure import compiled

from recompute_lab.measure import flops
from recompute_lab.config import CompileBackend
from recompute_lab.config.spec import RunSpec
from recompute_lab.measure.overhead import build_baseline
from recompute_lab.strategies import parse_options


def session_of(spec: RunSpec) -> Optional[compiled.Session]:
    """The run's compilation (None for compile.backend=off, and for configs saved before the compile
    group)."""
    c = spec.compile
    return None if c is None or c.backend == CompileBackend.off else compiled.Session(c)


GRAD_RTOL = {
    torch.float32: 1e-4,
    torch.bfloat16: 2e-2,
    torch.float16: 2e-2,
}  # of max |g_eager| per tensor


def first_step(
    spec: RunSpec,
    model: torch.nn.Module,
    session: compiled.Session,
    policy,
    device: torch.device,
    batch: tuple,
) -> dict:
    """The compiled model's first forward + backward, outside the timed loop (it compiles unless the
    probe did),
    with the partitioned graphs measured over it and its gradients checked against eager ``none`` on
    the same
    batch and weights. Gradients are dropped afterwards and the RNG restored: training starts as if
    unprobed."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):

        def step() -> torch.Tensor:
            with policy.autocast(device.type):
                loss = model(*batch)
            loss.backward()
            return loss.detach()

        session.recorder.reset()
        loss = session.first_step(step, "training model's warm-up step")
        graphs = _graph_counts(session)
        grads = {
            n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
        }
        model.zero_grad(set_to_none=True)
        check = _gradient_check(spec, model, policy, device, batch, loss, grads)
    return {**session.describe(), "graphs_per_step": graphs, "gradient_check": check}


def _graph_counts(session: compiled.Session) -> dict:
    if not session.records_graphs:
        return {"available": False, "reason": compiled.INDUCTOR_FLOPS_REASON}
    try:
        return {"available": True, **compiled.graph_measurements(session.recorder)}
    except (
        Exception
    ) as e:  # a graph that cannot run on its fake values: the count is missing, not wrong
        return {"available": False, "reason": f"{type(e).__name__}: {e}"}


def _gradient_check(
    spec: RunSpec,
    model: torch.nn.Module,
    policy,
    device: torch.device,
    batch: tuple,
    loss: torch.Tensor,
    grads: dict,
) -> dict:
    """max over parameters of max |g - g_eager| / max |g_eager| against eager ``none`` sharing the
    weights."""
    if spec.model.dropout > 0:
        return {
            "ok": None,
            "reason": "model.dropout > 0: compiled graphs draw their own random masks",
        }
    rtol = GRAD_RTOL.get(policy.autocast_dtype or policy.param_dtype, 1e-4)
    # eager `none` on the compiled model's very tensors (build_baseline reads only .policy and
    # .model)
    ref_model = build_baseline(spec, policy, model, parse_options({"name": "none"}))
    with policy.autocast(device.type):
        ref_loss = ref_model(*batch)
    ref_loss.backward()
    worst, where = 0.0, None
    for name, p in model.named_parameters():
        if p.grad is None or name not in grads:
            continue
        err = ((grads[name] - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)).item()
        if err > worst:
            worst, where = err, name
    model.zero_grad(set_to_none=True)
    return {
        "ok": worst <= rtol and len(grads) > 0,
        "max_rel_diff": worst,
        "worst_param": where,
        "rtol": rtol,
        "params_compared": len(grads),
        "loss": loss.item(),
        "eager_loss": ref_loss.item(),
        "method": "compiled step vs eager strategy none, same weights and batch; per parameter "
        "max|g - g_eager| / max|g_eager|",
    }


def recompute_flops(spec: RunSpec, counted: dict, graphs: dict) -> dict:
    """The meta count with its recompute replaced by the compiled graphs': forward and backward stay
    the model's
    FLOPs (compiling changes neither); recompute = FLOPs of backward-graph nodes that depend on no
    gradient, per
    micro-batch, times the micro-batches. The graphs must hold the whole forward of the compiled
    scope (every
    block, or the whole model): FLOPs of an eager remainder (a graph break) would otherwise be
    missed."""
    out = {
        **counted,
        "eager_recompute": counted["recompute"],
        "method": "forward / backward: FlopCounterMode on a meta replica (the model's FLOPs); "
        "recompute: "
        "FlopCounterMode over the compiled backward graphs, nodes that depend on no tangent",
    }
    if not graphs.get("available"):
        return {**out, "recompute": None, "recompute_reason": graphs.get("reason")}
    b, s = spec.data.batch_size, spec.data.seq_len
    parts = flops.module_forward_flops(spec, b, s)
    scope = str(spec.compile.scope)
    expected = (
        spec.model.n_layer * parts["block"]
        if scope == "block"
        else flops.predict_step_flops(spec)["forward"] // spec.trainer.grad_accum
    )
    if graphs["forward"] != expected:
        return {
            **out,
            "recompute": None,
            "recompute_reason": f"the compiled graphs hold {graphs['forward']} of the {expected} "
            f"forward FLOPs "
            f"of compile.scope={scope} (a graph break?): recompute outside them is not seen",
        }
    return {**out, "recompute": graphs["recompute"] * spec.trainer.grad_accum}
