"""SDXL and the SD1.x/2.x UNet family for diffcore (models ``sdxl``, ``sd15``, ``sd21``)."""
