"""`fastdiff bench`: this machine's table of the fused backends against the plain-PyTorch reference.

Ops are looked up at run time (each fastdiff.ops module's public function, its SUPPORTED backends and
fastdiff.backends()); a missing op or backend is listed with the reason, never an error. GB/s = bytes / best time,
with the bytes each op must move stated below the table (reads + writes of the tensors the fused op touches). The
last rows time a whole DDIM loop of the bundled model with every op on the reference vs on "auto".
"""
from __future__ import annotations

import importlib
import os
import time
from typing import Callable

import torch

from fastdiff import _backend


def _timeit(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Best (minimum) seconds of `repeat` calls after one warm-up call, synchronised on CUDA. The minimum, not the
    median: on a CPU shared with other jobs the noise only ever adds time."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def _cases(device: torch.device, quick: bool):
    """(op, shape label, bytes, {"reference": fn, backend: fn, ...} builder) per known op; None where missing."""
    g = torch.Generator("cpu").manual_seed(0)

    def rnd(*shape):
        return torch.randn(shape, generator=g).to(device)

    if device.type == "cuda":
        sizes = [(64, 128, 32, 32)] if quick else [(64, 128, 32, 32), (256, 256, 32, 32)]
    else:
        sizes = [(16, 64, 16, 16)] if quick else [(16, 64, 16, 16), (64, 128, 16, 16)]
    out = []
    for shape in sizes:
        n = 1
        for s in shape:
            n *= s

        def sampler_step(mod, shape=shape, n=n):
            x, o = rnd(*shape), rnd(*shape)
            coef = torch.tensor(mod.step_coefs("ddim", 0.5, 0.6), dtype=torch.float64, device=device)
            fns = {"reference": lambda: mod.ddim_step_ref(x, o, 0.5, 0.6)}
            for b in _backends_of(mod, device):
                fns[b] = lambda b=b: mod.sampler_step(x, o, coef, backend=b)
            return "DDIM step η=0 (x, o → x')", 3 * n * 4, fns

        def group_norm_silu(mod, shape=shape, n=n):
            x = rnd(*shape)
            w, b_ = rnd(shape[1]), rnd(shape[1])
            groups = 32 if shape[1] % 32 == 0 else 1
            fns = {"reference": lambda: mod.group_norm_silu_ref(x, w, b_, groups)}
            for b in _backends_of(mod, device):
                fns[b] = lambda b=b: mod.group_norm_silu(x, w, b_, groups, backend=b)
            return f"GroupNorm({groups})+SiLU", 2 * n * 4, fns

        def attention(mod, shape=shape):
            B, C, H, W = shape
            q, k, v = rnd(B, 1, H * W, C), rnd(B, 1, H * W, C), rnd(B, 1, H * W, C)
            fns = {"reference": lambda: mod.attention_ref(q, k, v)}
            for b in _backends_of(mod, device):
                fns[b] = lambda b=b: mod.attention(q, k, v, backend=b)
            return "attention, 1 head, L=H·W", 4 * B * H * W * C * 4, fns

        out += [("sampler_step", shape, sampler_step), ("group_norm_silu", shape, group_norm_silu),
                ("attention", shape, attention)]
    return out


def _backends_of(mod, device: torch.device) -> list[str]:
    info = _backend.backends()
    names = []
    for b in getattr(mod, "SUPPORTED", _backend.BACKENDS):
        if b == "torch" or not info.get(b, {}).get("available"):
            continue
        if b == "cpp" and device.type != "cpu" or b == "cuda" and device.type != "cuda":
            continue
        if b == "triton" and device.type != "cuda":
            continue  # the CPU interpreter is a correctness tool, not a speed one
        names.append(b)
    return names


def _unavailable(mod, device: torch.device) -> list[str]:
    info = _backend.backends()
    notes = []
    for b in getattr(mod, "SUPPORTED", ()):
        if b == "torch":
            continue
        if not info.get(b, {}).get("available"):
            notes.append(f"{b}: {info.get(b, {}).get('why', 'unknown')}")
        elif b == "triton" and device.type != "cuda":
            notes.append("triton: not timed on CPU (interpreter)")
    return notes


def _loop_rows(device: torch.device, repeat: int, quick: bool):
    from fastdiff import checkpoint as ckpt
    from fastdiff import jobs

    path = ckpt.bundled_checkpoint()
    if not os.path.isfile(path):
        return [("DDIM loop (bundled model)", "-", "-", "-", "-", "skipped: bundled checkpoint missing")]
    model, meta = ckpt.load_checkpoint(path, device=device)
    steps, B = (5, 16) if quick else (20, 64)
    cfg = jobs.SampleConfig("ddim", steps, 0.0, 0, "float32", B)
    from fastdiff.sampling import OPTION_NAMES, resolve_schedule

    sch = meta["scheduler"]
    schedule, _ = resolve_schedule(sch or None, {})
    opts = {k: sch[k] for k in OPTION_NAMES if k in sch}
    c, s = meta["config"]["in_channels"], meta["config"]["sample_size"]
    idx = list(range(B))
    rows, base = [], None
    for label, env in (("reference", "torch"), ("auto", None)):
        old = os.environ.get("FASTDIFF_BACKEND")
        if env:
            os.environ["FASTDIFF_BACKEND"] = env
        try:
            dt = _timeit(lambda: jobs.sample_batch(model, idx, cfg, schedule, opts, (c, s, s), device),
                         device, repeat)
        finally:
            if old is None:
                os.environ.pop("FASTDIFF_BACKEND", None)
            else:
                os.environ["FASTDIFF_BACKEND"] = old
        base = base or dt
        rows.append((f"DDIM {steps} steps, bundled UNet2D", f"{B}×{c}×{s}×{s}", label, f"{dt * 1e3:.1f}",
                     f"{B / dt:.0f} img/s", f"{base / dt:.2f}×"))
    return rows


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def run(device: torch.device, repeat: int = 5, quick: bool = False, out=print) -> int:
    import platform

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name() or platform.processor()
    out(f"fastdiff bench on {device} ({name}), torch {torch.__version__}, triton {tv}, "
        f"{torch.get_num_threads()} CPU threads")
    out("backends:")
    for b, st in _backend.backends().items():
        out(f"  {b:7s} {'yes' if st['available'] else 'no ':3s}  {st['why']}")
    header = ("op", "shape (fp32)", "backend", f"ms (best of {repeat})", "GB/s", "vs reference")
    rows = []
    notes = []
    done = set()
    for op, shape, build in _cases(device, quick):
        try:
            mod = importlib.import_module(f"fastdiff.ops.{op}")
        except ImportError as e:
            if op not in done:
                notes.append(f"fastdiff.ops.{op}: not importable ({e}); skipped")
            done.add(op)
            continue
        if not hasattr(mod, op):
            if op not in done:
                notes.append(f"fastdiff.ops.{op}: no fused entry point `{op}` yet; skipped")
            done.add(op)
            continue
        if op not in done:
            notes += [f"{op}: {n}" for n in _unavailable(mod, device)]
            done.add(op)
        try:
            label, nbytes, fns = build(mod)
        except Exception as e:  # an op whose API changed: say so, keep going
            notes.append(f"{op}: could not build inputs ({type(e).__name__}: {e}); skipped")
            continue
        base = None
        for b, fn in fns.items():
            try:
                dt = _timeit(fn, device, repeat)
            except Exception as e:
                rows.append((label, "×".join(map(str, shape)), b, "-", "-", f"failed: {type(e).__name__}: {e}"))
                continue
            base = base or dt
            rows.append((label, "×".join(map(str, shape)), b, f"{dt * 1e3:.3f}", f"{nbytes / dt / 1e9:.1f}",
                         f"{base / dt:.2f}×"))
    try:
        rows += _loop_rows(device, repeat, quick)
    except Exception as e:
        notes.append(f"DDIM loop: failed ({type(e).__name__}: {e})")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out("")
    out("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    out("  ".join("-" * w for w in widths))
    for r in rows:
        out("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    if notes:
        out("")
        out("notes:")
        for n in notes:
            out(f"  {n}")
    out("")
    out("bytes per op: DDIM step 3·N·4 (read x, o; write x'); GroupNorm+SiLU 2·N·4 (read x, write y); "
        "attention 4·B·L·D·4 (read q, k, v; write o). 'reference' is the plain-PyTorch *_ref function.")
    return 0
