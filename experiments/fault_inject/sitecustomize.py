"""Faults injected into a sweep's job processes (experiments/fault_matrix.py's sweep cells and
tests/integration/test_sweep_faults.py): put this folder first on PYTHONPATH and set

    RECOMPUTE_LAB_FAULT_SEED=N   the job whose trainer.seed is N gets the fault
    RECOMPUTE_LAB_FAULT=die      its process exits at once (os._exit(9)): a joblib worker dies
    RECOMPUTE_LAB_FAULT=sigterm  SIGTERM to its own process at its first training step

Python imports sitecustomize in every process it starts (joblib's loky workers included); nothing
happens unless both variables are set.
"""

import os
import sys

_SEED, _FAULT = os.environ.get("RECOMPUTE_LAB_FAULT_SEED"), os.environ.get("RECOMPUTE_LAB_FAULT")


class _PatchEngine:
    """Wraps recompute_lab.run.engine.run once it is imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "recompute_lab.run.engine":
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            real_run = module.run

            def run(cfg, *args, **kwargs):
                if str(cfg.trainer.seed) == _SEED:
                    if _FAULT == "die":
                        os._exit(9)
                    if _FAULT == "sigterm":
                        _term_at_first_step()
                return real_run(cfg, *args, **kwargs)

            module.run = run

        spec.loader.exec_module = exec_module
        return spec


def _term_at_first_step():
    import signal

    from recompute_lab.model.data import Batches

    real_get = Batches.get

    def get(self, step, micro=0):
        if step == 1 and micro == 0:
            Batches.get = real_get
            os.kill(os.getpid(), signal.SIGTERM)
        return real_get(self, step, micro)

    Batches.get = get


if _SEED and _FAULT:
    sys.meta_path.insert(0, _PatchEngine())
