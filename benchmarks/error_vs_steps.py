"""Error against model calls for every sampler, on a 2-D Gaussian mixture with the exact oracle.

No network: the model is `fastdiff.theory.toy.GaussianMixture.model`, the exact ε*, so the only error left is the sampler's
discretization. Two panels:
  - deterministic samplers (DDIM η=0, DPM-Solver++ 2M/3M, UniPC 2/3, Euler, Heun, PLMS, PNDM): the median L2 distance,
    over the same x_T, to a reference trajectory (DPM-Solver++ 3M with 999 steps; its own distance to DDIM-1000 is
    printed) — the probability-flow ODE's discretization error, per model call;
  - stochastic samplers (DDPM, DDIM η=1, Euler ancestral, SDE-DPM-Solver++ 2M) and annealed Langevin: a sliced
    Wasserstein-1 estimate between the samples and the exact mixture (W1 rather than W2: mass that changes mode moves
    ~4 units, and W2 ~ √(mass) would let weight noise swamp everything); the dashed line is the same estimate for an
    exact sample of the same size (the Monte-Carlo floor, below which differences are noise).

    python benchmarks/error_vs_steps.py                 # writes docs/error_vs_steps.png and .json (the numbers)
    python benchmarks/error_vs_steps.py --calibrated    # UniPC-2 by grid, calibrated included, on three oracles
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
from fastdiff.theory import toy
from fastdiff.theory.langevin import langevin_sample, score_from_eps, vp_levels
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
    for name, kw in STOCHASTIC.items():
        if name not in ("DDPM", "DDIM η=1"):
            samplers[name] = lambda N, kw=kw: fastdiff.sample(eps_model, N, shape=(n, 2), generator=g(),
                                                                dtype=torch.float64, **kw)
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


# name -> fastdiff.sample keywords; every deterministic sampler starts at t = T−1 (linspace/trailing grids)
DETERMINISTIC = {
    "DDIM": dict(sampler="ddim", timestep_spacing="linspace"),
    "DPM-Solver++ 2M": dict(sampler="dpmsolver++"),
    "DPM-Solver++ 3M": dict(sampler="dpmsolver++", solver_order=3),
    "UniPC-2 (bh2)": dict(sampler="unipc"),
    "UniPC-3 (bh2)": dict(sampler="unipc", solver_order=3),
    "Euler": dict(sampler="euler"),
    "Heun": dict(sampler="heun"),
    "PLMS": dict(sampler="plms"),
    "PNDM (PRK warm-up)": dict(sampler="pndm"),
}
STOCHASTIC = {
    "DDPM": dict(sampler="ddpm", timestep_spacing="linspace"),
    "DDIM η=1": dict(sampler="ddim", eta=1.0, timestep_spacing="linspace"),
    "Euler ancestral": dict(sampler="euler_ancestral"),
    "SDE-DPM-Solver++ 2M": dict(sampler="sde-dpmsolver++", timestep_spacing="trailing"),
}


def model_calls(kw: dict, steps: int) -> int:
    """Model evaluations of `steps` steps (Heun: 2·steps − 1; PNDM's PRK warm-up: 3 extra per warm-up step)."""
    from fastdiff import samplers as S

    name = kw["sampler"]
    if name in ("ddim", "ddpm"):
        return steps
    opts = S.solver_options(name, None, {k: v for k, v in kw.items() if k != "sampler"})
    return S.build_plan(name, NoiseSchedule.linear(), steps, opts).steps


def reference_trajectory(mix, sched, xT):
    return fastdiff.sample(mix.model(sched), 999, sampler="dpmsolver++", solver_order=3, timestep_spacing="trailing",
                           x_T=xT)


def trajectory_errors(n: int, steps_grid, seed: int, samplers=None):
    """{name: [(model calls, median ‖x − x_ref‖, seconds)]} for the deterministic samplers, same x_T (float64)."""
    mix, sched = mixture(), NoiseSchedule.linear()
    xT = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ref = reference_trajectory(mix, sched, xT)
    ddim1000 = fastdiff.sample(mix.model(sched), 1000, sampler="ddim", timestep_spacing="linspace", x_T=xT)
    out = {"reference": "DPM-Solver++ 3M, 999 steps (trailing)",
           "reference_vs_ddim1000": (ddim1000 - ref).norm(dim=1).median().item(), "n": n}
    for name, kw in (samplers or DETERMINISTIC).items():
        rows = []
        for N in steps_grid:
            if kw["sampler"] == "pndm" and N < 4:
                continue
            t0 = time.time()
            x = fastdiff.sample(mix.model(sched), N, x_T=xT, **kw)
            rows.append((model_calls(kw, N), (x - ref).norm(dim=1).median().item(), time.time() - t0))
            print(f"{name:20s} calls={rows[-1][0]:5d}  median err={rows[-1][1]:.2e}", flush=True)
        out[name] = rows
    return out


def plot(traj, dist, path: pathlib.Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12.8, 5.6), dpi=110)
    for name, rows in traj.items():
        if not isinstance(rows, list):
            continue
        style = dict(marker="o", lw=2.5) if name.startswith(("DPM", "UniPC")) else dict(marker=".", ls="--")
        ax1.plot([r[0] for r in rows], [r[1] for r in rows], label=name, **style)
    ax1.axhline(traj["reference_vs_ddim1000"], ls=":", c="gray", label="DDIM-1000 vs the reference")
    ax1.set_title(f"Deterministic: probability-flow trajectory error (n={traj['n']}, same x_T)")
    ax1.set_ylabel("median ‖x − x_ref‖ (reference: DPM-Solver++ 3M, 999 steps)")
    for name, rows in dist.items():
        if name in ("floor", "floor_std", "n"):
            continue
        style = dict(marker="s", ms=9, mfc="none", lw=3, alpha=0.6) if name.startswith("DDPM") else dict(marker="o")
        label = name + " (= DDIM η=1: same math, same noise)" if name.startswith("DDPM") else name
        ax2.plot([r[0] for r in rows], [r[1] for r in rows], label=label, **style)
    ax2.axhline(dist["floor"], ls="--", c="gray", label=f"exact samples, same n (noise floor, mean of {FLOOR_DRAWS})")
    ax2.axhspan(dist["floor"] - dist["floor_std"], dist["floor"] + dist["floor_std"], color="gray", alpha=0.15)
    ax2.set_title(f"Stochastic: distance to the exact mixture (n={dist['n']})")
    ax2.set_ylabel("sliced Wasserstein-1 to the exact mixture")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model calls")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)
    fig.suptitle("Discretization error with the exact ε* of a 2-D 3-mode Gaussian mixture (linear β, T = 1000)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


CALIBRATION_CASES = {  # held-out-style oracles: (mixture, schedule)
    "2-D 3 modes, linear β": (lambda: mixture(), NoiseSchedule.linear),
    "3-D 5 modes, cosine": (lambda: toy.GaussianMixture([0.1, 0.2, 0.3, 0.2, 0.2], [[-3.0, 0.0, 1.0], [2.0, 1.0, 0.0],
                                                        [0.0, -3.0, 2.0], [1, 1, 1], [-1, 2, -2]], 0.15),
                            NoiseSchedule.cosine),
    "2-D 3 modes, scaled-linear β": (lambda: mixture(), NoiseSchedule.scaled_linear),
}


def calibrated_panel(n: int, budgets, batch: int, seed: int):
    """UniPC-2's trajectory error per model call on the exact mixture oracles: diffusers' default grid, the
    model-blind grids and fastdiff.calibrate's grid (calibration batch `batch`, seed 0; evaluated on n other x_T's
    against DPM-Solver++ 3M-999). Returns {case: {"E_ddim50", "E_ddim20", curves...}}."""
    from fastdiff.run.calibration import _rms, calibrate_report

    out = {}
    for case, (mk, sk) in CALIBRATION_CASES.items():
        mix, sched = mk(), sk()
        m = mix.model(sched)
        xT = torch.randn(n, mix.means.shape[1], generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
        ref = fastdiff.sample(m, 999, sampler="dpmsolver++", solver_order=3, timestep_spacing="trailing", x_T=xT,
                              schedule=sched)
        res = {"E_ddim50": _rms(fastdiff.ddim_sample(m, 50, x_T=xT, schedule=sched), ref),
               "E_ddim20": _rms(fastdiff.ddim_sample(m, 20, x_T=xT, schedule=sched), ref)}
        for name, kw in [("default grid", {}), ("log-SNR", dict(time_grid="logsnr")),
                         ("quadratic", dict(time_grid="quadratic")), ("Karras", dict(use_karras_sigmas=True)),
                         ("calibrated", None)]:
            rows = []
            for N in budgets:
                t0 = time.time()
                if kw is None:
                    r = calibrate_report(m, N, sampler="unipc", shape=(batch, mix.means.shape[1]), schedule=sched,
                                         generator=torch.Generator().manual_seed(0), progress=False)
                    kw_n, secs = dict(timesteps=r.timesteps), time.time() - t0
                else:
                    kw_n, secs = kw, None
                e = _rms(fastdiff.sample(m, N, sampler="unipc", x_T=xT, schedule=sched, **kw_n), ref)
                rows.append((N, e) if secs is None else (N, e, secs))
                print(f"{case:30s} {name:12s} calls={N:3d} err={e:.4f}" + (f" ({secs:.1f} s)" if secs else ""),
                      flush=True)
            res[name] = rows
        out[case] = res
    return out


def plot_calibrated(panel, path: pathlib.Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panel), figsize=(5.2 * len(panel), 4.6), dpi=110)
    for ax, (case, res) in zip(axes, panel.items()):
        for name, rows in res.items():
            if name.startswith("E_"):
                continue
            style = dict(marker="o", lw=2.5) if name == "calibrated" else dict(marker=".", ls="--")
            ax.plot([r[0] for r in rows], [r[1] for r in rows], label=name, **style)
        ax.axhline(res["E_ddim50"], c="k", ls=":", label="DDIM-50")
        ax.axhline(res["E_ddim20"], c="gray", ls=":", label="DDIM-20")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"UniPC-2 by grid: {case}", fontsize=9)
        ax.set_xlabel("model calls")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("mean RMS distance to DPM-Solver++ 3M-999")
    fig.tight_layout()
    fig.savefig(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="samples per stochastic run (default 20000)")
    ap.add_argument("--n-traj", type=int, default=4000, help="trajectories per deterministic run (default 4000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="few step counts only")
    ap.add_argument("--out", default=str(ROOT / "docs" / "error_vs_steps.png"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these small tensors)")
    ap.add_argument("--calibrated", action="store_true",
                    help="only the calibrated-grid panel (docs/error_vs_steps_calibrated.png and .json)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.calibrated:
        panel = calibrated_panel(2000, [6, 8, 10, 12], 256, a.seed)
        path = pathlib.Path(a.out).with_name("error_vs_steps_calibrated.png")
        plot_calibrated(panel, path)
        path.with_suffix(".json").write_text(json.dumps({"command": "python benchmarks/error_vs_steps.py --calibrated",
                                                         "panel": panel}, indent=1))
        print(f"wrote {path} and its .json")
        return
    grid = [10, 50, 200] if a.quick else [10, 20, 50, 100, 200, 500, 1000]
    lgrid = [100, 500] if a.quick else [100, 200, 500, 1000, 2000, 5000]
    tgrid = [5, 10, 20] if a.quick else [5, 7, 10, 15, 20, 30, 50, 100, 200]
    traj = trajectory_errors(a.n_traj, tgrid, a.seed)
    dist = run(a.n, grid, lgrid, a.seed)
    plot(traj, dist, pathlib.Path(a.out))
    table = pathlib.Path(a.out).with_suffix(".json")  # the plotted numbers: (model calls, error, seconds) per sampler
    table.write_text(json.dumps({"command": "python benchmarks/error_vs_steps.py", "seed": a.seed,
                                 "trajectory": traj, "distribution": dist}, indent=1))
    print(f"wrote {a.out} and {table}")


if __name__ == "__main__":
    main()
