"""An example diffcore method plugin: a side network steering a frozen model with a control image."""
