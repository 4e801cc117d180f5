"""Running a plan: the public sampling API (`sampling`: sample, ddim_sample, ddpm_sample, plan_for, run_plan), the one
loop every plan runs through (`loop`), CUDA-graph capture shared with fastdiff.optimize (`graphs`), and per-model
grids computed by running samplers (`calibration`: fastdiff.calibrate)."""
