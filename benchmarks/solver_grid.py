"""A picture: the bundled digits model sampled by every sampler at 10, 20 and 50 model calls, same seed.

    python benchmarks/solver_grid.py            # writes docs/solvers_grid.png (a few seconds on a 2-core CPU)

Rows are samplers, columns model-call budgets; every cell is the same 16 images (the same x_T and per-step noise).
Heun spends 2·steps − 1 calls and PNDM 3 extra calls per warm-up step, so their step counts are chosen to fit the
budget (the label says the calls actually made).
"""
from __future__ import annotations

import argparse
import pathlib

import numpy as np
import torch

import fastdiff
from fastdiff.app import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROWS = [("DDIM", dict(sampler="ddim")), ("DDPM", dict(sampler="ddpm")),
        ("DPM-Solver++ 2M", dict(sampler="dpmsolver++")), ("SDE-DPM-Solver++", dict(sampler="sde-dpmsolver++")),
        ("UniPC", dict(sampler="unipc")), ("Euler", dict(sampler="euler")),
        ("Euler ancestral", dict(sampler="euler_ancestral")), ("Heun", dict(sampler="heun")),
        ("PLMS", dict(sampler="plms")), ("PNDM", dict(sampler="pndm"))]
BUDGETS = (10, 20, 50)


def steps_for(kw, calls):
    if kw["sampler"] == "heun":
        return (calls + 1) // 2, 2 * ((calls + 1) // 2) - 1
    if kw["sampler"] == "pndm":
        return max(calls - 9, 4), max(calls - 9, 4) + 9
    if kw["sampler"] == "plms":
        return calls - 1, calls
    return calls, calls


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "solvers_grid.png"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from PIL import Image, ImageDraw

    model, meta = checkpoint.load_checkpoint(checkpoint.bundled_checkpoint())
    sch = meta["scheduler"]
    opts = {k: sch[k] for k in ("prediction_type",) if k in sch}
    n, s, pad, label_w, head = 16, 10 * 3, 8, 130, 18
    cell = 4 * s
    W = label_w + len(BUDGETS) * (cell + pad)
    H = head + len(ROWS) * (cell + pad)
    canvas = Image.new("L", (W, H), 255)
    draw = ImageDraw.Draw(canvas)
    for j, calls in enumerate(BUDGETS):
        draw.text((label_w + j * (cell + pad) + cell // 3, 2), f"{calls} calls", fill=0)
    for r, (name, kw) in enumerate(ROWS):
        y = head + r * (cell + pad)
        draw.text((4, y + cell // 2 - 6), name, fill=0)
        for j, calls in enumerate(BUDGETS):
            steps, used = steps_for(kw, calls)
            x = fastdiff.sample(model, steps, shape=(n, 1, 8, 8), generator=torch.Generator().manual_seed(a.seed),
                                **kw, **opts)
            imgs = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
            imgs = np.pad(imgs, ((0, 0), (1, 1), (1, 1)), constant_values=96)  # a gray frame around each digit
            tile = np.block([[imgs[4 * i + k] for k in range(4)] for i in range(4)])
            tile = Image.fromarray(tile).resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (cell + pad), y))
            if used != calls:
                draw.text((label_w + j * (cell + pad) + 2, y + cell - 12), f"{used}", fill=255)
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
