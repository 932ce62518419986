"""Model building blocks. They own parameters and weight loading, and call fdpp.ops; never kernels."""
