"""Error against model calls on the bundled digits model: stock grids, model-blind grids and calibrated grids.

    python benchmarks/calibrated_grids.py            # docs/calibrated_grids.{png,json}, docs/calibrated_samples.png

The error is the mean over 256 x_T's of the per-sample RMS distance to a converged solution from the same x_T
(DPM-Solver++ 3M, 999 trailing steps); DDIM-50's and DDIM-20's errors (diffusers' default leading grid) are the
horizontal lines. "calls to reach DDIM-50" interpolates log error against log calls between measured budgets.
Calibrated grids: fastdiff.calibrate(model, N, sampler=..., shape=(64, 1, 8, 8), generator seeded 0), held-out x_T's
for its own check; the 256 evaluation x_T's are a third, independent draw. Several minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import time

import numpy as np
import torch

import fastdiff
from fastdiff.app import checkpoint
from fastdiff.run.calibration import _rms, calibrate_report

ROOT = pathlib.Path(__file__).resolve().parents[1]
CURVES = {  # name -> (sampler keywords, grid keywords or "calibrated")
    "DPM-Solver++ 2M, default grid": (dict(sampler="dpmsolver++"), {}),
    "UniPC-2, default grid": (dict(sampler="unipc"), {}),
    "UniPC-2, Karras σ's": (dict(sampler="unipc"), dict(use_karras_sigmas=True)),
    "UniPC-2, log-SNR grid": (dict(sampler="unipc"), dict(time_grid="logsnr")),
    "UniPC-2, quadratic grid": (dict(sampler="unipc"), dict(time_grid="quadratic")),
    "iPNDM-3, quadratic grid (fastdiff.sample's default)": (dict(sampler="ipndm"), dict(time_grid="quadratic")),
    "UniPC-2, calibrated": (dict(sampler="unipc"), "calibrated"),
    "iPNDM-3, calibrated": (dict(sampler="ipndm"), "calibrated"),
}


def calls_to_reach(rows, target):
    """Model calls at which the error curve crosses `target` (log-log interpolation), or None."""
    for (n0, e0), (n1, e1) in zip(rows, rows[1:]):
        if e0 > target >= e1:
            f = (math.log(e0) - math.log(target)) / (math.log(e0) - math.log(e1))
            return math.exp(math.log(n0) + f * (math.log(n1) - math.log(n0)))
    return rows[0][0] if rows and rows[0][1] <= target else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--budgets", default="5,6,8,10,12,14,16,20")
    ap.add_argument("--calib-batch", type=int, default=64)
    ap.add_argument("--reference", default=None, help="a saved reference (torch.save of the 999-step solution)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "calibrated_grids.png"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, meta = checkpoint.load_checkpoint(checkpoint.bundled_checkpoint())
    xT = torch.randn(a.n, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t0 = time.time()
    if a.reference and pathlib.Path(a.reference).exists():
        ref = torch.load(a.reference)
    else:
        ref = fastdiff.sample(model, 999, sampler="dpmsolver++", solver_order=3, timestep_spacing="trailing", x_T=xT)
    print(f"reference: {time.time() - t0:.0f} s", flush=True)
    e50 = _rms(fastdiff.ddim_sample(model, 50, x_T=xT), ref)
    e20 = _rms(fastdiff.ddim_sample(model, 20, x_T=xT), ref)
    budgets = [int(b) for b in a.budgets.split(",")]
    out = {"command": "python benchmarks/calibrated_grids.py", "n": a.n, "E_ddim50": e50, "E_ddim20": e20,
           "curves": {}, "calibration": {}, "calls_to_ddim50": {}}
    grids_kept = {}
    for name, (skw, gkw) in CURVES.items():
        rows = []
        for N in budgets:
            if gkw == "calibrated":
                r = calibrate_report(model, N, shape=(a.calib_batch, 1, 8, 8), generator=torch.Generator().manual_seed(0),
                                     progress=False, **skw)
                out["calibration"][f"{name} {N}"] = {"seconds": r.seconds, "model_calls": r.model_calls,
                                                     "timesteps": [float(t) for t in r.timesteps],
                                                     "chosen": r.errors["chosen"]}
                grids_kept[(name, N)] = r.timesteps
                kw = dict(timesteps=r.timesteps)
                print(f"  calibrate {name} N={N}: {r.seconds:.1f} s, {r.model_calls} calls, {r.errors['chosen']}",
                      flush=True)
            else:
                kw = gkw
            e = _rms(fastdiff.sample(model, N, x_T=xT, **skw, **kw), ref)
            rows.append((N, e))
            print(f"{name:55s} calls={N:3d} err={e:.4f}", flush=True)
        out["curves"][name] = rows
        out["calls_to_ddim50"][name] = calls_to_reach(rows, e50)
    path = pathlib.Path(a.out)
    path.with_suffix(".json").write_text(json.dumps(out, indent=1))
    plot(out, path)
    images(model, grids_kept, path.parent / "calibrated_samples.png")
    print(json.dumps(out["calls_to_ddim50"], indent=1))


def plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.6), dpi=110)
    for name, rows in out["curves"].items():
        style = dict(marker="o", lw=2.5) if "calibrated" in name else dict(marker=".", ls="--")
        ax.plot([r[0] for r in rows], [r[1] for r in rows], label=name, **style)
    ax.axhline(out["E_ddim50"], c="k", ls=":", label="DDIM-50 (leading)")
    ax.axhline(out["E_ddim20"], c="gray", ls=":", label="DDIM-20 (leading)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model calls")
    ax.set_ylabel(f"mean RMS distance to DPM-Solver++ 3M-999 (n={out['n']})")
    ax.set_title("Bundled digits model: error per model call, by grid")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def images(model, grids_kept, path):
    """16 digits, same x_T: UniPC-2 on the default grid vs a calibrated grid at 5/8/10 calls, and DDIM-50."""
    from PIL import Image, ImageDraw

    xT = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    s, pad, label_w, head = 24, 8, 150, 18
    cols = [5, 8, 10]
    cell = 4 * (s + 2)
    W, H = label_w + (len(cols) + 1) * (cell + pad), head + 2 * (cell + pad)
    canvas = Image.new("L", (W, H), 255)
    draw = ImageDraw.Draw(canvas)
    for j, n in enumerate(cols + [50]):
        draw.text((label_w + j * (cell + pad) + 4, 2), f"{n} calls" + (" (DDIM)" if n == 50 else ""), fill=0)
    for r, (label, cal) in enumerate([("UniPC-2, default grid", False), ("UniPC-2, calibrated", True)]):
        y = head + r * (cell + pad)
        draw.text((4, y + cell // 2 - 6), label, fill=0)
        for j, n in enumerate(cols + [50]):
            if n == 50:
                x = fastdiff.ddim_sample(model, 50, x_T=xT)
            elif cal and ("UniPC-2, calibrated", n) in grids_kept:
                x = fastdiff.sample(model, sampler="unipc", x_T=xT, timesteps=grids_kept[("UniPC-2, calibrated", n)])
            else:
                x = fastdiff.sample(model, n, sampler="unipc", x_T=xT)
            im = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
            im = np.pad(im, ((0, 0), (1, 1), (1, 1)), constant_values=128)
            tile = np.block([[im[4 * i + k] for k in range(4)] for i in range(4)])
            canvas.paste(Image.fromarray(tile).resize((cell, cell), Image.NEAREST), (label_w + j * (cell + pad), y))
    canvas.save(path)


if __name__ == "__main__":
    main()
