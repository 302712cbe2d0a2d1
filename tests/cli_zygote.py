"""A warm start for the CLI subprocesses the tests run (the suite starts ~150 of them), and for the
experiments/ scripts they run.

A cold ``python -m recompute_lab.train`` spends 3-7 s on these 2 shared cores importing torch,
torch._dynamo (torch.optim's constructor imports it) and Hydra before it runs a line of the project.
Here one process per test worker (the zygote) imports those third-party libraries (``WARM``) once
and then forks a child per command (a tiny training run: ~6 s cold, ~2.5 s forked). The child does
what ``python -m MODULE ARGS`` does in a fresh interpreter: its own argv, working directory,
environment, stdin (/dev/null), stdout and stderr (files the client reads), ``sys.path[0]`` the
working directory, the project's modules imported anew (the zygote never imports ``recompute_lab``),
``__main__`` the module, atexit handlers and exit status as Python's own shutdown gives them.

What a fork cannot reproduce, the client sends to a cold ``subprocess.run`` instead: a command
whose environment changes a variable read while the pre-imported libraries load (``START_UP``
prefixes: the OpenMP/BLAS runtimes read their thread counts when the library is loaded). Tests about
interpreter start-up itself (what a command imports, console scripts, the README's command) run
their own cold subprocess, not this.

Protocol (one JSON line each way, on the zygote's stdin/stdout): request ``{module, args, cwd, env,
out, err}``; replies ``{"pid": N}`` once the child is forked, then ``{"rc": N}`` when it ends
(``-signal`` when a signal killed it, as subprocess reports). One command at a time per zygote: a
pytest-xdist worker runs its tests one after another.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys

# Environment variables read when torch, NumPy's BLAS, OpenMP, Matplotlib (its config and cache
# folders), transformers (Hugging Face offline mode, cache paths) or Python itself load: a
# command that sets one differently from the zygote runs cold.
# W&B's own variables are read when a run starts, not on import (only its launch modules, which
# nothing here imports, read any at module level).
START_UP = (
    "PYTHON",
    "OMP_",
    "GOMP_",
    "KMP_",
    "MKL_",
    "OPENBLAS_",
    "LD_",
    "TORCH",
    "PYTORCH",
    "CUDA_",
    "MPL",
    "HOME",
    "XDG_",
    "HF_",
    "HUGGINGFACE",
    "TRANSFORMERS",
)
# Imported once in the zygote: the third-party libraries every CLI command loads. Never the
# project's own modules: their import-time code must run in each child. Not W&B: on import it
# makes a media folder and registers its removal with atexit, which every child would run at its
# exit, deleting the folder under the next one (only runs with logger=wandb import it anyway).
WARM = (
    "numpy",
    "torch",
    "torch._dynamo",
    "torch.utils.checkpoint",
    "torch.distributed",
    "omegaconf",
    "hydra",
    "hydra.main",
    "hydra._internal.utils",
    "einops",
    "matplotlib",
    "matplotlib.pyplot",
    "transformers",  # model=hf (optional: the `hf` extra)
    "transformers.configuration_utils",
)


def start_up_env(env: dict) -> dict:
    return {k: v for k, v in env.items() if k.startswith(START_UP)}


def _child(req: dict) -> None:
    """In the forked child: become ``python -m module args`` and leave by SystemExit (normal
    interpreter shutdown: atexit handlers run, buffers flush)."""
    import runpy
    import weakref

    # Finalizers the zygote's imports registered (e.g. a TemporaryDirectory's removal) are the
    # zygote's to run when it exits; a child that ran them as its shutdown freed the object would
    # delete a resource every later child shares. A cold interpreter makes and removes its own.
    for finalizer in list(weakref.finalize._registry):
        finalizer.detach()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, req["out"]), (2, req["err"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    if "tempfile" in sys.modules:  # its folder is read from TMPDIR once: read it again here
        sys.modules["tempfile"].tempdir = None
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if req.get("script"):
        # `python path.py`: the script's folder (links resolved) first on the path, argv[0] the
        # path as given, no __spec__
        sys.path[0] = os.path.dirname(os.path.realpath(req["script"]))
        sys.argv = [req["script"], *req["args"]]
        runpy.run_path(req["script"], run_name="__main__")
    else:
        sys.path[0] = req["cwd"]  # `python -m` puts the working directory first
        sys.argv = [req["module"], *req["args"]]  # run_module sets argv[0] to the module's file
        runpy.run_module(req["module"], run_name="__main__", alter_sys=True)
    sys.exit(0)


def serve() -> None:
    """The zygote's loop: import WARM, then fork a child per request until stdin closes."""
    proto_in = os.fdopen(os.dup(0), "rb")
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)  # a library that prints while importing must not corrupt the protocol
    import gc
    import importlib

    for name in WARM:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional extra not installed
            pass
    # What the imports made, frozen (the gc module's advice before forking): a child's
    # collections then scan only its own objects, not the libraries' millions (a full collection
    # ~0.3 s otherwise, paid by every run's release_host_memory and by automatic ones). The
    # product's freezing blocks see the freeze when imported and leave it in force.
    gc.collect()
    gc.freeze()
    sys.path.pop(0)  # this file's folder: the child puts its working directory there
    sys.path.insert(0, "")
    proto_out.write(b'{"ready": true}\n')
    for line in proto_in:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            proto_in.close()
            proto_out.close()
            _child(req)  # never returns
        proto_out.write(json.dumps({"pid": pid}).encode() + b"\n")
        _, status = os.waitpid(pid, 0)
        proto_out.write(json.dumps({"rc": os.waitstatus_to_exitcode(status)}).encode() + b"\n")


class Zygote:
    """The client side, held by one test worker."""

    def __init__(self, env: dict):
        self.env = dict(env)
        self.proc = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self.env,
        )
        self._buf = b""
        self._read(timeout=300)  # ready

    def _read(self, timeout: float | None) -> dict | None:
        """The next reply line, or None after ``timeout`` s. Reads the raw descriptor: a buffered
        reader could hold the next line where select cannot see it."""
        import time

        end = None if timeout is None else time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = None if end is None else max(0.0, end - time.monotonic())
            if not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"the CLI zygote exited ({self.proc.wait()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def fits(self, env: dict) -> bool:
        return start_up_env(env) == start_up_env(self.env)

    def run(
        self,
        module: str | None,
        args: list[str],
        cwd,
        env: dict,
        timeout: float,
        script: str | None = None,
    ):
        """Run ``python -m module args`` (or ``python script args``) in a forked child; a
        CompletedProcess as ``subprocess.run(capture_output=True, text=True)`` returns, or
        TimeoutExpired."""
        import tempfile

        cmd = [sys.executable, *([script] if script else ["-m", module]), *args]
        with tempfile.TemporaryDirectory() as d:
            out, err = os.path.join(d, "stdout"), os.path.join(d, "stderr")
            req = {
                "module": module,
                "script": script,
                "args": list(args),
                "cwd": str(cwd),
                "env": env,
                "out": out,
                "err": err,
            }
            self.proc.stdin.write(json.dumps(req).encode() + b"\n")
            self.proc.stdin.flush()
            pid = self._read(timeout=60)["pid"]
            reply = self._read(timeout)
            timed_out = reply is None
            if timed_out:  # as subprocess.run: kill the child (not its own children)
                os.kill(pid, signal.SIGKILL)
                reply = self._read(timeout=60)
            texts = [open(p, encoding=None, errors="strict").read() for p in (out, err)]
        if timed_out:
            raise subprocess.TimeoutExpired(cmd, timeout, output=texts[0], stderr=texts[1])
        return subprocess.CompletedProcess(cmd, reply["rc"], texts[0], texts[1])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


if __name__ == "__main__":
    serve()
