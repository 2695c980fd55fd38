"""diffcore-vae: the image autoencoders latent architectures ask for by family name.

Use them through the public API, ``diffcore.load_autoencoder("sdxl", pretrained=...)``; the modules of
this package are its implementation. Importing it does not import torch.
"""
