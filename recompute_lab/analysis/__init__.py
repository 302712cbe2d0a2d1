"""Sweep analysis: results.json files -> one table row per run, five figures, and the seed
notebook's quiz.

aggregate  loads every results.json under a folder and pairs each run with its `none` baseline
figures    the five figures (matplotlib, Agg, PNG + PDF, black-and-white readable)
quiz       quiz.md: the seed notebook's four questions answered with the sweep's own numbers
callback   a Hydra callback that runs all of it when a multirun ends
Entry point: ``python -m recompute_lab.analyze SWEEP_DIR [--out DIR]``
(recompute_lab/cli/analyze.py).
"""
