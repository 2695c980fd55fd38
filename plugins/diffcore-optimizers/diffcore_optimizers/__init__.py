"""Optimizers for diffcore beyond the built-in AdamW and SGD, registered through the optimizer hook."""
