"""Discretization error vs number of steps on a 2-D Gaussian mixture, with the exact oracle
(docs/math.md, "Discretization error vs steps").

No network: the model is `fastdiff.toy.GaussianMixture.model`, the exact ε*, so the only error left is the sampler's
discretization (and the prior mismatch of q(x_{T−1}) vs N(0, I), ~1e-5 here). The distance between the sampled and
the true distribution is a sliced-Wasserstein-1 estimate against the mixture's exact projected CDF (W1 rather than W2:
mass that changes mode moves ~4 units, and W2 ~ √(mass) would let weight noise swamp everything); the dashed line is
the same estimate for an exact sample of the same size (the Monte-Carlo floor, below which differences are noise).

    python benchmarks/error_vs_steps.py                 # writes docs/error_vs_steps.png and .json (the numbers)
    python benchmarks/error_vs_steps.py --n 4000 --quick

Not collected by pytest (the file name does not start with test_ / bench_, and the work runs under __main__).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import torch

import fastdiff
from fastdiff import toy
from fastdiff.langevin import langevin_sample, score_from_eps, vp_levels
from fastdiff.schedule import NoiseSchedule

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLOOR_DRAWS = 5  # exact samples whose distance to the exact mixture gives the Monte-Carlo floor (mean ± std)


def mixture() -> toy.GaussianMixture:
    return toy.GaussianMixture([0.2, 0.3, 0.5], [[-2.0, 0.0], [2.0, 1.0], [0.0, -3.0]], 0.3)


def sliced_w1(x: torch.Tensor, mix: toy.GaussianMixture, n_proj: int = 128, grid: int = 4000, seed: int = 0) -> float:
    """Sliced Wasserstein-1 between the samples x and the exact mixture: E_θ ∫|F_n(u) − F(u)| du over directions θ,
    with F the projected mixture's exact CDF Σ w_k Φ((u − θᵀm_k)/s) (no reference sample, so no second noise)."""
    g = torch.Generator().manual_seed(seed)
    th = torch.randn(x.shape[1], n_proj, generator=g, dtype=torch.float64)
    th = th / th.norm(dim=0, keepdim=True)
    px, _ = (x.double() @ th).sort(0)  # (n, P)
    pm = mix.means @ th  # (K, P)
    lo = min(px.min().item(), pm.min().item() - 6 * mix.std) - 1e-3
    hi = max(px.max().item(), pm.max().item() + 6 * mix.std) + 1e-3
    u = torch.linspace(lo, hi, grid, dtype=torch.float64)
    du = (hi - lo) / (grid - 1)
    total = 0.0
    for p in range(n_proj):
        Fn = torch.searchsorted(px[:, p].contiguous(), u, right=True).double() / px.shape[0]
        F = (mix.weights[:, None] * torch.special.ndtr((u[None] - pm[:, p:p + 1]) / mix.std)).sum(0)
        total += ((Fn - F).abs().sum() * du).item()
    return total / n_proj


def run(n: int, steps_grid, langevin_steps, seed: int):
    mix = mixture()
    sched = NoiseSchedule.linear()
    floors = torch.tensor([sliced_w1(mix.sample(n, generator=torch.Generator().manual_seed(20_000 + seed + r)), mix)
                           for r in range(FLOOR_DRAWS)])
    eps_model = mix.model(sched)
    out = {"floor": floors.mean().item(), "floor_std": floors.std().item(), "n": n}

    def g():
        return torch.Generator().manual_seed(seed)

    samplers = {
        "DDPM (fixed_small)": lambda N: fastdiff.ddpm_sample(eps_model, steps=N, shape=(n, 2), generator=g(),
                                                              dtype=torch.float64, timestep_spacing="linspace"),
        "DDIM η=0": lambda N: fastdiff.ddim_sample(eps_model, N, shape=(n, 2), generator=g(), eta=0.0,
                                                    dtype=torch.float64, timestep_spacing="linspace"),
        "DDIM η=1": lambda N: fastdiff.ddim_sample(eps_model, N, shape=(n, 2), generator=g(), eta=1.0,
                                                    dtype=torch.float64, timestep_spacing="linspace"),
    }
    for name, fn in samplers.items():
        rows = []
        for N in steps_grid:
            t0 = time.time()
            x = fn(N)
            rows.append((N, sliced_w1(x, mix), time.time() - t0))
            print(f"{name:20s} steps={N:5d}  SW1={rows[-1][1]:.4f}  ({rows[-1][2]:.1f}s)", flush=True)
        out[name] = rows
    # Annealed Langevin on the ε-oracle's own timesteps: 10 levels × (total/10) steps, step ε = 0.1·σ_L².
    ts, sg = vp_levels(sched, 10, t_min=5)
    rows = []
    for N in langevin_steps:
        t0 = time.time()
        x = langevin_sample(score_from_eps(eps_model, sched), sg, max(N // len(sg), 1), 0.1 * sg[-1] ** 2,
                            levels=ts.tolist(), x_init=torch.randn(n, 2, generator=g(), dtype=torch.float64),
                            generator=g())
        total = max(N // len(sg), 1) * len(sg)
        rows.append((total, sliced_w1(x, mix), time.time() - t0))
        print(f"{'Langevin (10 levels)':20s} steps={total:5d}  SW1={rows[-1][1]:.4f}  ({rows[-1][2]:.1f}s)", flush=True)
    out["Langevin (10 levels)"] = rows
    return out


def plot(res, path: pathlib.Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=120)
    for name, rows in res.items():
        if name in ("floor", "floor_std", "n"):
            continue
        style = dict(marker="s", ms=9, mfc="none", lw=3, alpha=0.6) if name.startswith("DDPM") else dict(marker="o")
        label = name + " (= DDIM η=1: same math, same noise)" if name.startswith("DDPM") else name
        ax.plot([r[0] for r in rows], [r[1] for r in rows], label=label, **style)
    ax.axhline(res["floor"], ls="--", c="gray", label=f"exact samples, same n (noise floor, mean of {FLOOR_DRAWS})")
    ax.axhspan(res["floor"] - res["floor_std"], res["floor"] + res["floor_std"], color="gray", alpha=0.15)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sampler steps (model evaluations)")
    ax.set_ylabel("sliced Wasserstein-1 to the exact mixture")
    ax.set_title(f"Discretization error, exact oracle, 2-D 3-mode mixture (n={res['n']})")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="samples per run (default 20000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="steps 10, 50, 200 only")
    ap.add_argument("--out", default=str(ROOT / "docs" / "error_vs_steps.png"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small tensors)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    grid = [10, 50, 200] if a.quick else [10, 20, 50, 100, 200, 500, 1000]
    lgrid = [100, 500] if a.quick else [100, 200, 500, 1000, 2000, 5000]
    res = run(a.n, grid, lgrid, a.seed)
    plot(res, pathlib.Path(a.out))
    table = pathlib.Path(a.out).with_suffix(".json")  # the plotted numbers: (steps, SW1, seconds) per sampler
    table.write_text(json.dumps({"command": "python benchmarks/error_vs_steps.py", "seed": a.seed, **res}, indent=1))
    print(json.dumps(res, indent=None))
    print(f"wrote {a.out} and {table}")


if __name__ == "__main__":
    main()
