"""Training-state checkpoints for interruption and resume: atomic, versioned, hashed, refused when
they do not match.

A checkpoint holds everything the next step depends on: model and optimizer state (master weights
included,
through the optimizer's own state_dict), the LR schedule, the RNG states (dropout masks), the step,
and the
loss/time history so far. Data needs no state: batch ``(step, micro)`` is a pure function of the
seed. Resuming
an interrupted run therefore continues with bit-identical losses.

File format (version 2). ``checkpoint.pt`` is one torch.save file holding a small container::

    {"format": FORMAT, "version": 2, "sha256": <hex digest of payload>, "payload": <uint8 tensor>}

where ``payload`` is the bytes of ``torch.save(state)``. Loading reads the container with
``torch.load(weights_only=True)``, checks the version, checks the sha256 of the payload bytes, and
only then
unpickles the payload, again with ``weights_only=True``. So:

* nothing in a checkpoint can run code: both unpicklings accept only tensors and plain containers /
numbers /
  strings (a crafted pickle is refused, never executed), which is why the state is kept to those
  types;
* a flipped bit in a tensor payload is refused before anything is restored (torch's zip reader does
not check
  its CRCs, so without the digest a corrupted weight would load silently). The digest detects
  damage, not
  tampering: whoever can write the file can recompute it. ``weights_only`` is the safety boundary;
* the container is itself a torch file, so ``torch.load`` still opens a checkpoint for inspection.

Every malformed checkpoint is refused with a ConfigError that says what is wrong; :func:`restore`
checks the
whole state against the model, optimizer and scheduler before it changes any of them, so it never
half-applies.
Writes go through recompute_lab.record.fileio (temp file, fsync, rename, fsync of the folder).

Layer: run.
"""

from __future__ import annotations

import errno
import hashlib
import os
import hmac
import io
import pickle
import re
from pathlib import Path
from typing import Any, Optional

import torch

from recompute_lab.record import fileio
from recompute_lab.config import ConfigError
from recompute_lab.config.spec import RunSpec

CHECKPOINT_VERSION = 2
FILENAME = "checkpoint.pt"
FORMAT = "recompute_lab checkpoint"
# Config sections that must match for a resumed run to continue the same training trajectory.
# compile too: an eager checkpoint resumed compiled would continue on other kernels (another
# trajectory) while the record claimed every step compiled. A fingerprint written before compile
# was in it lacks the section and is refused ("compile (None -> ...)"): eager or compiled cannot be
# told.
MUST_MATCH = ("model", "precision", "strategy", "data", "optimizer", "compile")
TRAINER_MUST_MATCH = ("steps", "grad_accum", "seed")
STATE_KEYS = (
    "version",
    "fingerprint",
    "step",
    "model",
    "optimizer",
    "scheduler",
    "rng",
    "history",
    "step_s",
)
CONTAINER_KEYS = ("version", "sha256", "payload")
_MAX_LISTED = 8  # names listed per problem in an error message; the rest are counted


def fingerprint(cfg: RunSpec) -> dict:
    c = cfg.to_dict()
    out = {k: c[k] for k in MUST_MATCH}
    out["trainer"] = {k: c["trainer"][k] for k in TRAINER_MUST_MATCH}
    return out


# -- save ------------------------------------------------------------------------------------------


def save(
    path: Path, *, cfg: RunSpec, step: int, model, optimizer, scheduler, history: list, step_s: list
) -> None:
    """Write the state after ``step`` completed steps, atomically and durably (see the module
    docstring)."""
    state = {
        "version": CHECKPOINT_VERSION,
        "fingerprint": fingerprint(cfg),
        "step": int(step),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
        # Plain floats: load() accepts numbers only, and a 0-d tensor slipping in would be one.
        "history": [float(v) for v in history],
        "step_s": [float(v) for v in step_s],
    }
    # Fail here, loudly, rather than write a file that weights_only loading would refuse at resume
    # time.
    _require_plain(state, "state")
    buf = io.BytesIO()
    torch.save(state, buf)
    view = buf.getbuffer()
    container = {
        "format": FORMAT,
        "version": CHECKPOINT_VERSION,
        "sha256": hashlib.sha256(view).hexdigest(),
        "payload": torch.frombuffer(view, dtype=torch.uint8),
    }  # a view of buf: no second copy
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A save killed mid-write (SIGKILL, OOM killer) leaves its temp file; the run folder belongs to
    # this run.
    fileio.remove_stale_temps(path.parent, path.name)
    with fileio.atomic_path(path) as tmp:
        try:
            torch.save(container, tmp)
        except RuntimeError as e:
            # torch's zip writer reports a short write as "unexpected pos 960 vs 854" (or an
            # iostream error): the disk is full or a file-size limit (ulimit -f) cut the file
            raise short_write(path, tmp, e) from None


def short_write(path: Path, tmp: Path, e: BaseException) -> OSError:
    """The OSError a failed torch.save becomes: ENOSPC named plainly when the temp file stopped
    short (torch's own message says only "unexpected pos")."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "unexpected pos" in str(e) or "iostream error" in str(e) or "file write failed" in str(e):
        try:
            written = f"{os.path.getsize(tmp):,} bytes written"
        except OSError:
            written = "nothing written"
        return OSError(
            errno.ENOSPC,
            f"no space left for checkpoint {path.name} (the disk is full or a file-size limit, "
            f"ulimit -f, was reached: {written}; torch: {text}); the previous checkpoint, if any, "
            "is kept",
            str(path),
        )
    return OSError(errno.EIO, f"checkpoint {path.name} could not be written ({text})", str(path))


_PLAIN_LEAVES = (bool, int, float, str, bytes, type(None), torch.Tensor, torch.dtype, torch.device)


def _require_plain(obj: Any, where: str) -> None:
    """Raise TypeError unless ``obj`` is made of tensors and plain containers / numbers / strings
    only."""
    if isinstance(obj, _PLAIN_LEAVES):
        return
    if isinstance(obj, dict):  # OrderedDict included (model.state_dict())
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint {where} has a key of type {type(k).__name__}")
            _require_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _require_plain(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"checkpoint {where} is a {type(obj).__module__}.{type(obj).__qualname__}; only tensors "
        f"and "
        "plain containers/numbers/strings can be loaded with weights_only=True"
    )


# -- locate / load ---------------------------------------------------------------------------------


def locate(resume: Any, run_dir: Path) -> Optional[Path]:
    """Map trainer.resume (null | true | a checkpoint file or run folder) to a checkpoint path, or
    None."""
    if resume in (None, False, "", "false", "False"):
        return None
    if resume in (True, "true", "True"):
        path = Path(run_dir) / FILENAME
        hint = (
            f"trainer.resume=true looks for {path}; rerun with hydra.run.dir=<the interrupted "
            f"run's folder> "
            f"or give trainer.resume=<path to {FILENAME}>"
        )
    else:
        path = Path(str(resume)).expanduser()
        path = path / FILENAME if path.is_dir() else path
        hint = f"trainer.resume={resume!r}: give a {FILENAME} file or the run folder that holds one"
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path} ({hint})")
    return path


def load(path: Path, cfg: RunSpec) -> dict:
    """Read and check a checkpoint; raise ConfigError for a corrupt, foreign, unsafe or mismatched
    file.

    The returned state has passed every check that needs only ``cfg``; :func:`restore` does the
    rest.
    """
    container = _torch_load(path, path, "file")
    if not isinstance(container, dict):
        raise ConfigError(
            f"checkpoint {path} is not a recompute_lab checkpoint (it holds a "
            f"{type(container).__name__}, not a dict)"
        )
    _check_version(path, container.get("version"))
    missing = [k for k in CONTAINER_KEYS if k not in container]
    if missing:
        raise ConfigError(f"checkpoint {path} is incomplete: missing keys {_names(missing)}")
    digest, payload = container["sha256"], container["payload"]
    if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise ConfigError(f"checkpoint {path} has a malformed sha256 entry ({_short(digest)})")
    if not (
        isinstance(payload, torch.Tensor) and payload.dtype == torch.uint8 and payload.dim() == 1
    ):
        raise ConfigError(
            f"checkpoint {path} has a malformed payload (expected a 1-d uint8 tensor)"
        )
    data = payload.contiguous().numpy()
    actual = hashlib.sha256(data).hexdigest()
    if not hmac.compare_digest(actual, digest):
        raise ConfigError(
            f"checkpoint {path} is corrupt: the sha256 of its payload is {actual}, the file "
            f"records "
            f"{digest} (bytes changed after it was written)"
        )
    state = _torch_load(io.BytesIO(data.tobytes()), path, "payload")
    _check_state(state, path, cfg)
    return state


def _torch_load(src, path: Path, what: str) -> Any:
    try:
        # weights_only=True, always: unpickling anything else can run code that the file chooses.
        return torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests retrying with weights_only=False; this tool never does. Keep the
        # reason only.
        found = re.search(r"(Unsupported [^\n]*?)(?: Please use|\n|$)", str(e))
        reason = (
            found.group(1).strip() if found else _short(str(e).splitlines()[0] if str(e) else e)
        )
        raise ConfigError(
            f"checkpoint {path} is unreadable or corrupt: its {what} holds something other than "
            f"tensors and plain data, refused without loading it ({reason})"
        ) from None
    except Exception as e:
        raise ConfigError(
            f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}: "
            f"{_short(str(e).splitlines()[0] if str(e) else '')})"
        ) from None


def _check_version(path: Path, found: Any) -> None:
    if type(found) is int and found == CHECKPOINT_VERSION:
        return
    if type(found) is int and found == 1:
        raise ConfigError(
            f"checkpoint {path} has version 1 (written by an older recompute_lab, without a "
            f"content "
            f"hash); this recompute_lab reads version {CHECKPOINT_VERSION} only: start the run "
            f"again"
        )
    raise ConfigError(
        f"checkpoint {path} has version {_short(repr(found))}; this recompute_lab reads version "
        f"{CHECKPOINT_VERSION}"
    )


def _check_state(state: Any, path: Path, cfg: RunSpec) -> None:
    """Everything about the unpickled state that can be checked without the model."""
    if not isinstance(state, dict):
        raise ConfigError(
            f"checkpoint {path} is malformed: its payload is a {type(state).__name__}, not a dict"
        )
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ConfigError(f"checkpoint {path} is incomplete: missing keys {_names(missing)}")
    _check_version(path, state["version"])
    if not isinstance(state["fingerprint"], dict):
        raise ConfigError(f"checkpoint {path} is malformed: 'fingerprint' is not a dict")
    theirs, ours = state["fingerprint"], fingerprint(cfg)
    diffs = sorted(_diff("", theirs, ours))
    if diffs:
        raise ConfigError(
            f"checkpoint {path} was written by a different configuration; differing keys: "
            + ", ".join(diffs)
        )
    steps, step = cfg.trainer.steps, state["step"]
    if type(step) is not int or not 0 <= step <= steps:
        raise ConfigError(
            f"checkpoint {path} is malformed: 'step' is {_short(step)}, expected an int in "
            f"0..{steps} (trainer.steps)"
        )
    for key in ("history", "step_s"):
        values = state[key]
        if not isinstance(values, list):
            raise ConfigError(
                f"checkpoint {path} is malformed: {key!r} is a {type(values).__name__}, not a list"
            )
        bad = [
            i for i, v in enumerate(values) if type(v) not in (int, float)
        ]  # bool excluded on purpose
        if bad:
            raise ConfigError(
                f"checkpoint {path} is malformed: {key!r} holds non-numbers at positions "
                f"{_names(bad)}"
            )
        if len(values) != step:
            raise ConfigError(
                f"checkpoint {path} is malformed: {key!r} has {len(values)} entries, expected one "
                f"per completed step ({step})"
            )
    model_sd = state["model"]
    if not isinstance(model_sd, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model_sd.items()
    ):
        raise ConfigError(
            f"checkpoint {path} is malformed: 'model' is not a dict of names to tensors"
        )
    opt = state["optimizer"]
    if not (
        isinstance(opt, dict)
        and isinstance(opt.get("state"), dict)
        and isinstance(opt.get("param_groups"), list)
        and all(
            isinstance(g, dict) and isinstance(g.get("params"), list) for g in opt["param_groups"]
        )
        and all(isinstance(s, dict) for s in opt["state"].values())
    ):
        raise ConfigError(
            f"checkpoint {path} is malformed: 'optimizer' is not an optimizer state_dict "
            "(a dict with 'state' and 'param_groups')"
        )
    if not isinstance(state["scheduler"], dict):
        raise ConfigError(f"checkpoint {path} is malformed: 'scheduler' is not a dict")
    rng = state["rng"]
    if not (
        isinstance(rng, dict)
        and _is_byte_tensor(rng.get("cpu"))
        and (
            rng.get("cuda") is None
            or (
                isinstance(rng["cuda"], (list, tuple))
                and all(_is_byte_tensor(t) for t in rng["cuda"])
            )
        )
    ):
        raise ConfigError(
            f"checkpoint {path} is malformed: 'rng' is not {{'cpu': uint8 tensor, "
            "'cuda': None or a list of uint8 tensors}"
        )


def _is_byte_tensor(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1


# -- restore ---------------------------------------------------------------------------------------


def check_against(state: dict, model, optimizer, scheduler=None) -> None:
    """Raise ConfigError unless ``state`` (from :func:`load`) fits this model / optimizer /
    scheduler exactly.

    Checked: the model's parameter and buffer names, shapes and dtypes; the optimizer's parameter
    groups and
    the shape of every per-parameter state tensor (Adam-style moments and master weights have the
    parameter's
    shape; the ``step`` counter is exempt); the scheduler's state keys and its per-group lists; the
    RNG state
    sizes. Changes nothing.
    """
    missing = (
        [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    )
    if missing:
        raise ConfigError(f"checkpoint state is incomplete: missing keys {_names(missing)}")
    problems = []
    ours, theirs = model.state_dict(), state["model"]
    if not isinstance(theirs, dict):
        raise ConfigError("checkpoint 'model' is not a dict of names to tensors")
    gone = [k for k in ours if k not in theirs]
    extra = [k for k in theirs if k not in ours]
    if gone:
        problems.append(f"missing model keys {_names(gone)}")
    if extra:
        problems.append(f"unexpected model keys {_names(extra)}")
    shapes = [
        f"{k} {tuple(theirs[k].shape)} vs the model's {tuple(v.shape)}"
        for k, v in ours.items()
        if k in theirs and isinstance(theirs[k], torch.Tensor) and theirs[k].shape != v.shape
    ]
    if shapes:
        problems.append(f"model shape mismatches: {_names(shapes, quote=False)}")
    dtypes = [
        f"{k} {theirs[k].dtype} vs the model's {v.dtype}"
        for k, v in ours.items()
        if k in theirs
        and isinstance(theirs[k], torch.Tensor)
        and theirs[k].shape == v.shape
        and theirs[k].dtype != v.dtype
    ]
    if dtypes:
        problems.append(f"model dtype mismatches: {_names(dtypes, quote=False)}")
    if any(not isinstance(v, torch.Tensor) for v in theirs.values()):
        problems.append("model entries that are not tensors")
    problems += _optimizer_problems(state["optimizer"], optimizer)
    if scheduler is not None:
        problems += _scheduler_problems(state["scheduler"], scheduler, len(optimizer.param_groups))
    problems += _rng_problems(state["rng"])
    if problems:
        raise ConfigError("checkpoint does not fit this model/optimizer: " + "; ".join(problems))


def _optimizer_problems(saved: Any, optimizer) -> list[str]:
    if not (
        isinstance(saved, dict)
        and isinstance(saved.get("param_groups"), list)
        and isinstance(saved.get("state"), dict)
    ):
        return ["'optimizer' is not an optimizer state_dict"]
    groups = saved["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        return [
            f"optimizer has {len(groups)} parameter groups, this run's has "
            f"{len(optimizer.param_groups)}"
        ]
    problems, by_id = [], {}
    for gi, (g, ours) in enumerate(zip(groups, optimizer.param_groups)):
        ids = g.get("params") if isinstance(g, dict) else None
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            problems.append(f"optimizer group {gi} has no list of integer parameter ids")
            continue
        if len(ids) != len(ours["params"]):
            problems.append(
                f"optimizer group {gi} has {len(ids)} parameters, this run's has "
                f"{len(ours['params'])}"
            )
            continue
        # Optimizer.load_state_dict takes the saved group dict as the new group: a missing
        # hyperparameter
        # would only surface as a KeyError at the next step.
        gone = [k for k in ours if k not in g]
        if gone:
            problems.append(f"optimizer group {gi} lacks {_names(gone)}")
        by_id.update(zip(ids, ours["params"]))  # the pairing Optimizer.load_state_dict makes
    if problems:
        return problems
    unknown = [i for i in saved["state"] if i not in by_id]
    if unknown:
        problems.append(f"optimizer state for unknown parameter ids {_names(unknown)}")
    bad = []
    for i, s in saved["state"].items():
        if i not in by_id:
            continue
        if not isinstance(s, dict):
            bad.append(f"param {i}: state is a {type(s).__name__}")
            continue
        p = by_id[i]
        bad += [
            f"param {i} {k} {tuple(v.shape)} vs {tuple(p.shape)}"
            for k, v in s.items()
            if k != "step" and isinstance(v, torch.Tensor) and v.shape != p.shape
        ]
    if bad:
        problems.append(f"optimizer state shape mismatches: {_names(bad, quote=False)}")
    return problems


def _scheduler_problems(saved: Any, scheduler, n_groups: int) -> list[str]:
    if not isinstance(saved, dict):
        return ["'scheduler' is not a dict"]
    # LRScheduler.load_state_dict is a __dict__.update: an extra key would overwrite any attribute
    # (scheduler.optimizer included), a missing one would silently keep the fresh value.
    ours = scheduler.state_dict()
    problems = []
    gone, extra = [k for k in ours if k not in saved], [k for k in saved if k not in ours]
    if gone:
        problems.append(f"missing scheduler keys {_names(gone)}")
    if extra:
        problems.append(f"unexpected scheduler keys {_names(extra)}")
    for k in ("last_epoch", "_step_count"):
        if k in saved and type(saved[k]) is not int:
            problems.append(f"scheduler {k} is {_short(saved[k])}, not an int")
    for k in ("base_lrs", "_last_lr"):
        v = saved.get(k)
        if k in saved and not (
            isinstance(v, list) and len(v) == n_groups and all(type(x) in (int, float) for x in v)
        ):
            problems.append(f"scheduler {k} is not a list of {n_groups} numbers")
    if "lr_lambdas" in ours:
        v = saved.get("lr_lambdas")
        if not (
            isinstance(v, list)
            and len(v) == len(ours["lr_lambdas"])
            and all(
                a is None and b is None or isinstance(a, dict) and isinstance(b, dict)
                for a, b in zip(v, ours["lr_lambdas"])
            )
        ):
            problems.append("scheduler lr_lambdas do not match this run's schedule functions")
    return problems


def _rng_problems(rng: Any) -> list[str]:
    if not (isinstance(rng, dict) and _is_byte_tensor(rng.get("cpu"))):
        return ["'rng' has no CPU generator state (a uint8 tensor)"]
    problems = []
    want = torch.get_rng_state().numel()
    if rng["cpu"].numel() != want:
        problems.append(f"CPU RNG state has {rng['cpu'].numel()} bytes, expected {want}")
    cuda = rng.get("cuda")
    if cuda is not None:
        if not (isinstance(cuda, (list, tuple)) and all(_is_byte_tensor(t) for t in cuda)):
            problems.append("CUDA RNG states are not a list of uint8 tensors")
        elif torch.cuda.is_available() and len(cuda) != torch.cuda.device_count():
            problems.append(
                f"CUDA RNG states for {len(cuda)} devices, this machine has "
                f"{torch.cuda.device_count()}"
            )
    return problems


def restore(state: dict, model, optimizer, scheduler) -> None:
    """Load ``state`` into the model, optimizer, scheduler and RNGs, or refuse before changing any
    of them."""
    check_against(state, model, optimizer, scheduler)
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(
            dict(state["scheduler"])
        )  # a copy: LambdaLR pops from and re-adds to it
        torch.set_rng_state(state["rng"]["cpu"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    except (
        Exception
    ) as e:  # check_against should make this unreachable; if not, still no raw traceback
        raise ConfigError(
            f"checkpoint could not be restored although it passed the checks; the model/optimizer "
            f"may be partly restored, do not continue this run ({type(e).__name__}: "
            f"{_short(str(e))})"
        ) from None


# -- helpers ---------------------------------------------------------------------------------------


def _names(items: list, quote: bool = True) -> str:
    shown = [repr(x) if quote else str(x) for x in items[:_MAX_LISTED]]
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return ", ".join(shown) + more


def _short(x: Any, limit: int = 200) -> str:
    s = x if isinstance(x, str) else repr(x)
    return s if len(s) <= limit else s[:limit] + "..."


def _diff(prefix: str, a: Any, b: Any) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in set(a) | set(b):
            out += _diff(f"{prefix}.{k}" if prefix else k, a.get(k), b.get(k))
        return out
    try:
        same = bool(a == b)
    except (
        Exception
    ):  # a crafted fingerprint may hold tensors (ambiguous truth value): such an entry differs
        same = False
    return [] if same else [f"{prefix} ({_short(a)} -> {_short(b)})"]
