"""Neural-network modules built on fastdiff's fused ops."""
from fastdiff.nn.unet import UNet2D, UNet2DConfig

__all__ = ["UNet2D", "UNet2DConfig"]
