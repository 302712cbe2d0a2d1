"""recompute_lab's Hydra launcher plugin (Hydra instantiates launchers from the hydra_plugins
namespace only): SafeJoblibLauncher, selected by ``hydra/launcher=joblib``
(conf/hydra/launcher/joblib.yaml). Kept light: Hydra imports every plugin module at start-up; the
work is in recompute_lab.cli.launchers, imported when a sweep launches."""

from __future__ import annotations

from typing import Sequence

try:
    from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher
except ImportError:  # the joblib launcher plugin is not installed: nothing to extend
    JoblibLauncher = None

if JoblibLauncher is not None:

    class SafeJoblibLauncher(JoblibLauncher):
        """JoblibLauncher whose sweep survives a worker that dies (recompute_lab.cli.launchers)."""

        def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
            from recompute_lab.cli.launchers import launch_surviving

            return launch_surviving(self, job_overrides, initial_job_idx)
