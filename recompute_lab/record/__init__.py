"""record/ — what a run leaves behind: the results.json contract and its one-screen summary, the run
folder and
its lock, crash-safe files, provenance, the W&B mirror and the log lines."""
