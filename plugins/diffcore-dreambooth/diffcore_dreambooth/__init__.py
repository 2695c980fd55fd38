"""DreamBooth with prior preservation as a diffcore method plugin."""
