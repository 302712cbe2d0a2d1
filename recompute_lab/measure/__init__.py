"""measure/ — what a real (or meta) model does: saved tensors, allocator / MemTracker peaks, the
memory probe, counted
FLOPs, paired timing and the time overhead, compiled-graph counting, hardware rates."""
