"""The one prediction of a run: model state, saved activations by module, the step's peak by phase
and FLOPs, for
one rank, from the spec, the strategy's plan and the micro-batch shape.

Layer: predict (no torch). Every consumer that reports one of these quantities calls :func:`predict`
(or its
model-state part, :func:`model_state`, where nothing else is known yet): the memory guard and the
probe's
"predicted" figures (recompute_lab.measure.probe), the run's model-state and FLOP predictions
(recompute_lab.run.engine), ``estimate`` (recompute_lab.cli.estimate) and the budget planner's
device-memory
budget (recompute_lab.strategies.budget). tests/integration/test_prediction.py holds them to it: the
same bytes for the same
quantity in every command, and a consumer with a formula of its own fails there.

The parts are recompute_lab.predict.theory (saved terms), recompute_lab.predict.peak (model state
and the step's
phases) and recompute_lab.predict.flops; they stay importable for their own tests, but a consumer
calls this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from recompute_lab.config.spec import Shape
from recompute_lab.predict import flops as F
from recompute_lab.predict import peak as P
from recompute_lab.predict import theory

# The most transformer blocks a replica (the guard's and estimate's meta one, or the real one) is
# built with. Each block is a handful of Python modules: here (2 shared cores) the estimate CLI
# took 49 s for 1,000 blocks and 230 s and 1.5 GB for 10,000, so n_layer=1e9 would run for weeks.
# The deepest published models stay far below (Llama 3 405B: 126 blocks; DeepNet: 1,000).
MAX_BLOCKS = 4096


@dataclass(frozen=True)
class Prediction:
    """What one rank of a run is predicted to hold and compute in one optimizer step.

    model_state   bytes by kind (params, grads, master, optimizer) and their total
                  (recompute_lab.predict.peak)
    activations   saved-for-backward bytes of one micro-batch: total, by_module, logits,
                  largest_region, reason
                  (total None: no closed form; ``source`` says where a total came from otherwise)
    peak          the step's peak: total, the binding phase and every phase (None without
                  activations)
    flops         forward / backward / recompute FLOPs per optimizer step (recompute None: not
                  predictable)
    """

    shape: Shape
    n_params: int
    model_state: dict
    activations: dict
    peak: Optional[dict]
    flops: dict

    @property
    def peak_bytes(self) -> Optional[int]:
        return None if self.peak is None else self.peak["total"]

    @property
    def activation_bytes(self) -> Optional[int]:
        return self.activations.get("total")


def model_state(model_cfg: Any, shape: Shape, n_params: Optional[int] = None) -> dict:
    """Model-state bytes one rank holds (the part of :func:`predict` that needs neither plan nor
    activations: the
    memory guard prices it before anything is built). ``n_params``: the whole model's count
    (default: from the
    shapes, recompute_lab.predict.theory.param_count)."""
    n = theory.param_count(model_cfg) if n_params is None else n_params
    return P.model_state(model_cfg, n, shape)


def activation_headroom(
    model_cfg: Any,
    shape: Shape,
    peak_limit: int,
    largest_region: int = 0,
    n_params: Optional[int] = None,
    view: Optional[P.RankView] = None,
    state: Optional[dict] = None,
) -> dict:
    """The most saved-activation bytes for which every phase of the step's predicted peak (the
    peak :func:`predict` reports, recompute_lab.predict.peak.predict_peak) stays within
    ``peak_limit``, for a plan whose largest recompute region re-saves ``largest_region`` bytes
    while it reruns (0: nothing reruns).

    No phase is named here: the phases are whatever predict_peak returns, and the only property
    used is that each is non-decreasing in the saved bytes. The first guess takes every phase that
    moves with the activations to move byte for byte; the guess is checked against the peak itself
    and, if a phase grows otherwise, replaced by a bisection. Returns
      without_activations  every phase's bytes with nothing saved
      over                 the phases above ``peak_limit`` with nothing saved (then bytes is None)
      bytes                the activation budget: the largest total that fits (None: none fits)
      binding              the phase that one more byte would push over ``peak_limit`` (with
                           ``over``: the largest of those phases)
      model_state          this rank's model state (:func:`model_state`, or ``state``)

    ``view`` and ``state``: one pipeline rank's share of the model under a parallel layout
    (recompute_lab.predict.per_gpu.view_of and layout.model_state_per_rank), as per_gpu prices a
    rank's peak; default the whole model on one rank.
    """
    state = model_state(model_cfg, shape, n_params) if state is None else state

    def phases(activations: int) -> dict:
        act = {"total": activations, "largest_region": largest_region}
        return P.predict_peak(model_cfg, shape, state, act, view)["phases"]

    def fits(activations: int) -> bool:
        return max(phases(activations).values()) <= peak_limit

    bare = phases(0)
    over = {k: v for k, v in bare.items() if v > peak_limit}
    out = {"without_activations": bare, "over": over, "model_state": state}
    if over:
        return {**out, "bytes": None, "binding": max(over, key=over.get)}
    one = phases(1)
    moving = [k for k in bare if one[k] > bare[k]]
    best = min((peak_limit - bare[k] for k in moving), default=peak_limit)
    if not (fits(best) and not fits(best + 1)):
        low, high = 0, peak_limit + 1  # fits(0); a phase holding the activations exceeds at high
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        best = low
    after = phases(best + 1)
    binding = max((k for k in after if after[k] > peak_limit), key=after.get)
    return {**out, "bytes": best, "binding": binding}


def step_peak(
    model_cfg: Any,
    shape: Shape,
    activations: int,
    largest_region: int = 0,
    n_params: Optional[int] = None,
) -> dict:
    """The step's predicted peak (:func:`predict`'s ``peak``) for ``activations`` saved bytes and a
    largest recompute region of ``largest_region`` bytes: for a plan priced before it is a Plan (the
    budget planner checks its plan with it)."""
    act = {"total": activations, "largest_region": largest_region}
    return P.predict_peak(model_cfg, shape, model_state(model_cfg, shape, n_params), act)


def predict(
    spec: Any,
    plan: Any,
    shape: Shape,
    n_params: Optional[int] = None,
    counted_activations: Optional[int] = None,
) -> Prediction:
    """The prediction for ``spec`` (a RunSpec) under ``plan`` (a Plan; None: nothing recomputed) at
    ``shape``.

    Activations come from the theory's closed form; where it has none, from the plan's own
    prediction (the budget
    planner's probed cost model) or, last, ``counted_activations``: saved bytes counted on a meta
    replica by the
    caller (this layer runs no model). ``n_params`` defaults to the count from the shapes.
    """
    m = spec.model
    n = theory.param_count(m) if n_params is None else int(n_params)
    state = P.model_state(m, n, shape)
    act = dict(theory.predict_activations(m, shape, plan))
    if act.get("total") is not None:
        act["source"] = "theory"
    elif plan is not None and plan.predicted_activation_bytes is not None:
        act = {
            "total": plan.predicted_activation_bytes,
            "largest_region": plan.predicted_largest_region or 0,
            "by_module": None,
            "logits": None,
            "reason": "predicted by the budget planner's probed cost model",
            "source": "plan",
        }
    elif counted_activations is not None:
        act = {
            "total": int(counted_activations),
            "largest_region": 0,
            "by_module": None,
            "logits": None,
            "reason": f"no closed form ({act.get('reason')}): saved bytes counted on a meta "
            f"replica",
            "source": "meta count",
        }
    peak = P.predict_peak(m, shape, state, act)
    return Prediction(
        shape=shape,
        n_params=n,
        model_state=state,
        activations=act,
        peak=peak,
        flops=F.predict_step_flops(spec, plan),
    )
