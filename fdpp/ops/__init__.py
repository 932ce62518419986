"""The dispatch layer: one function per op; each picks the plain-PyTorch reference or a Triton kernel."""
