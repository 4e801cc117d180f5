"""The theory, executable: exact Gaussian-mixture oracles (`toy`), the variational bound (`vlb`), the training
objective (`training`), Langevin dynamics (`langevin`). docs/math.md has the formulas."""
