"""A tiny untrained UNet2D (8-16 channels, 16×16, T = 1000) saved as a fastdiff checkpoint: the model of the tests of
the command line, resumable runs and checkpoint files (random weights are enough to compare bits)."""
import torch

from fastdiff.app import checkpoint, trainer


def save_tiny_checkpoint(path, seed: int = 0) -> str:
    from fastdiff.nn import UNet2D

    cfg = trainer.TrainConfig(block_out_channels=[8, 16], norm_num_groups=4)
    torch.manual_seed(seed)
    checkpoint.save_checkpoint(str(path), UNet2D(**trainer.unet_config(cfg, 1)),
                               scheduler=trainer.scheduler_config(cfg), image={"channels": 1, "size": cfg.image_size})
    return str(path)
