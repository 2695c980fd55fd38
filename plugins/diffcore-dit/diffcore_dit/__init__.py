"""diffcore-dit: the Diffusion Transformer of Peebles & Xie (2023) as a diffcore model plugin."""
