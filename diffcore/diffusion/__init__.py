"""Diffusion math: noise schedules, objectives, training-time sampling, loss weights and samplers.

``config`` is torch-free (the scheduler records use it at discovery); the other modules need torch.
"""
