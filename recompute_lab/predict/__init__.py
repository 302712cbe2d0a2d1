"""predict/ — closed-form predictions from shapes alone (no torch import): model state, saved
activations by module,
the step's peak by phase, per-GPU bytes under parallel layouts, Hugging Face theory."""
