"""Tensor parallelism on torch.distributed: the rank's group (``state``), sharded layers (``layers``),
process start-up, the per-step broadcast and the watchdog (``launch``)."""
