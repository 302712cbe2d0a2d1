"""run/ — one training run end to end: the engine (build, probe, loop, summarize), compiled steps,
checkpoints,
data-parallel processes, and how a run ends when it fails."""
