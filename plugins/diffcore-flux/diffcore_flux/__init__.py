"""Flux.1 (dev, schnell, Kontext) for diffcore. Importing this package does not import torch."""
