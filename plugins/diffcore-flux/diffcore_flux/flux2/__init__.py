"""Flux.2 (dev, klein-4b, klein-9b) beside Flux.1: network, key maps, loading and the model object."""
