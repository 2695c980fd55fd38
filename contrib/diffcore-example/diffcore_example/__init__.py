"""An example diffcore plugin."""
