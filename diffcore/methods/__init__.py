"""Training methods shipped with the kernel."""
