"""Textual inversion as a diffcore method plugin."""
