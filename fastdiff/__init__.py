"""fastdiff: fused kernels and CUDA-graph samplers for diffusion sampling (DDIM, DDPM, DPM-Solver++, UniPC, Euler,
Heun, PLMS).

    import fastdiff
    x = fastdiff.ddim_sample(model, steps=50, shape=(4, 3, 32, 32))
"""
from fastdiff.theory import toy
from fastdiff._backend import backends
from fastdiff.theory.langevin import langevin_sample
from fastdiff.ops.sampler_step import sampler_step
from fastdiff.run.sampling import ddim_sample, ddpm_sample, sample
from fastdiff.run.calibration import calibrate
from fastdiff import optimize  # a callable module: fastdiff.optimize(pipe), fastdiff.optimize.report(pipe)
from fastdiff.schedule import NoiseSchedule, timesteps
from fastdiff.theory.training import q_sample, training_loss
from fastdiff.theory.vlb import vlb

__version__ = "0.1.0"
__all__ = ["NoiseSchedule", "backends", "calibrate", "ddim_sample", "ddpm_sample", "langevin_sample", "optimize", "q_sample",
           "sample", "sampler_step", "timesteps", "toy", "training_loss", "vlb"]
