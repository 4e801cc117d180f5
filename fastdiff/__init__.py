"""fastdiff: fused kernels and CUDA-graph samplers for DDPM / DDIM sampling.

    import fastdiff
    x = fastdiff.ddim_sample(model, steps=50, shape=(4, 3, 32, 32))
"""
from fastdiff._backend import backends
from fastdiff.schedule import NoiseSchedule, timesteps
from fastdiff.sampling import ddim_sample, ddpm_sample
from fastdiff.training import q_sample, training_loss
from fastdiff import toy  # noqa: E402  (issue 6: exact Gaussian-mixture oracle)
from fastdiff.langevin import langevin_sample
from fastdiff.vlb import vlb

__version__ = "0.1.0"
__all__ = ["NoiseSchedule", "backends", "ddim_sample", "ddpm_sample", "q_sample", "timesteps", "toy", "training_loss", "langevin_sample", "vlb"]
