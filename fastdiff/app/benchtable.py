"""`fastdiff bench`: this machine's table of the fused backends against the plain-PyTorch reference.

Ops are looked up at run time (each fastdiff.ops module's public function, its SUPPORTED backends and
fastdiff.backends()); a missing op or backend is listed with the reason, never an error.

How it measures, so that a figure means something on a shared machine:
- interleaved: every round runs the reference and each fused backend once, in an order shuffled per round, so a
  load that comes and goes hits all of them alike; a ratio is the median over rounds of the ratio *within* a round.
- disturbed rounds are dropped: on the CPU each call's CPU time is compared with its wall time × threads; a call that
  got less than MIN_CPU_SHARE of the cores it asked for was descheduled (another job ran) and its round is not used.
- repeated until stable: rounds continue until the per-round ratios agree (relative half-IQR <= STABLE_SPREAD) or the
  round / time budget is spent; a figure that did not settle is printed as "noisy" with its spread, never as a ratio.
- the load (1-minute load average against the cores) and the thread count are printed; a CPU that other jobs already
  saturate runs with 1 thread unless --threads says otherwise (as `fastdiff sample` and `train` do).
- units are kept apart: the op table is in ms and GB/s (bytes each op must move / median time), the end-to-end table in
  ms per batch and images/s.
"""
from __future__ import annotations

import importlib
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from fastdiff import _backend

MIN_CPU_SHARE = 0.8  # a call that got less of its threads' CPU time than this was descheduled: its round is dropped
STABLE_SPREAD = 0.05  # a ratio is stable when half its inter-quartile range is at most this fraction of its median
NOISY_SPREAD = 0.15  # ... and printed as "noisy" when, at the end, half its IQR is above this fraction


@dataclass
class Timing:
    """Interleaved timings of several callables (the first is the reference): per round each one's wall seconds and
    CPU share (process CPU time / (wall · threads)). A round is clean when every call in it got at least
    MIN_CPU_SHARE of the best share that callable had in any round (an op that uses fewer threads than the pool is
    judged against itself), and with one thread of the whole core (a steady load that descheduled every round is
    not a clean baseline); on CUDA every round is clean."""

    names: list
    cpu: bool = True
    threads: int = 1
    wall: list = field(default_factory=list)  # per round: {name: seconds}
    share: list = field(default_factory=list)  # per round: {name: CPU share}
    seconds: float = 0.0  # wall time spent

    @property
    def rounds(self) -> int:
        return len(self.wall)

    def clean_rounds(self) -> list:
        if not self.cpu:
            return list(self.wall)
        best = {n: max(r[n] for r in self.share) for n in self.names}
        if self.threads == 1:
            best = {n: max(b, 1.0) for n, b in best.items()}
        return [w for w, sh in zip(self.wall, self.share) if all(sh[n] >= MIN_CPU_SHARE * best[n] for n in self.names)]

    @property
    def clean(self) -> int:
        return len(self.clean_rounds())

    @property
    def dropped(self) -> int:
        return self.rounds - self.clean

    def secs(self, name: str) -> list:
        return [w[name] for w in self.clean_rounds()]

    def ratios(self, name: str) -> list:
        """base seconds / name seconds within each clean round."""
        base = self.names[0]
        return [w[base] / w[name] for w in self.clean_rounds() if w[name] > 0]

    def median_s(self, name: str) -> float | None:
        s = self.secs(name)
        return statistics.median(s) if s else None

    def median_any_s(self, name: str) -> tuple[float | None, bool]:
        """(median seconds, whether from clean rounds): the clean rounds' median, else that of every round."""
        s = self.median_s(name)
        if s is not None or not self.wall:
            return s, s is not None
        return statistics.median(w[name] for w in self.wall), False

    @staticmethod
    def spread(values) -> float | None:
        """Half the inter-quartile range relative to the median (None with fewer than 3 values)."""
        if len(values) < 3:
            return None
        q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return (q3 - q1) / 2 / med if med > 0 else None

    def ratio(self, name: str) -> tuple[float | None, float | None]:
        """(median of the per-round ratios, their relative half-IQR)."""
        r = self.ratios(name)
        return (statistics.median(r) if r else None), self.spread(r)

    def noisy(self, name: str, min_clean: int) -> bool:
        med, sp = self.ratio(name)
        return med is None or self.clean < min_clean or sp is None or sp > NOISY_SPREAD

    def stable(self, min_clean: int) -> bool:
        if self.clean < min_clean:
            return False
        spreads = [self.ratio(n)[1] for n in self.names[1:]]
        return all(sp is not None and sp <= STABLE_SPREAD for sp in spreads)


def _cpu_time() -> float:
    return time.process_time()  # all of this process's threads (the intra-op pool included)


def interleave(fns: dict, device: torch.device, *, min_rounds: int = 5, max_rounds: int = 40,
               budget_s: float = 4.0, threads: int | None = None, seed: int = 0) -> Timing:
    """Time `fns` (name -> callable; the first is the reference) side by side until the ratios are stable.

    Every round runs each callable once in a shuffled order (Timing says which rounds were disturbed). Stops once
    `min_rounds` rounds are clean and every ratio's spread is <= STABLE_SPREAD, or at `max_rounds` rounds, or after
    `budget_s` seconds (always at least `min_rounds` rounds)."""
    names = list(fns)
    threads = threads or torch.get_num_threads()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for f in fns.values():  # warm-up, outside the timing
        f()
    sync()
    t = Timing(names, cpu=device.type == "cpu", threads=threads)
    rng = random.Random(seed)
    order = list(names)
    t_start = time.perf_counter()
    while True:
        rng.shuffle(order)
        wall, share = {}, {}
        for n in order:
            c0, t0 = _cpu_time(), time.perf_counter()
            fns[n]()
            sync()
            dt, dc = time.perf_counter() - t0, _cpu_time() - c0
            wall[n] = dt
            share[n] = dc / (dt * threads) if dt > 0 else 1.0
        t.wall.append(wall)
        t.share.append(share)
        t.seconds = time.perf_counter() - t_start
        if t.rounds >= min_rounds and (t.stable(min_rounds) or t.rounds >= max_rounds or t.seconds >= budget_s):
            return t


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


def _ratio_cell(t: Timing, name: str, min_clean: int) -> str:
    """The "vs reference" cell: the median per-round ratio ± its spread, or "noisy" (never a ratio that did not
    settle)."""
    med, sp = t.ratio(name)
    if t.noisy(name, min_clean):
        why = f"±{sp:.0%}" if sp is not None and t.clean >= min_clean else f"{t.clean} clean rounds"
        return f"noisy ({why})"
    return f"{med:.2f}× ±{sp:.0%}"


def _ms_cell(t: Timing, name: str) -> str:
    s, clean = t.median_any_s(name)
    if s is None:
        return "-"
    if not clean:  # no clean round: the median of the disturbed ones, marked as such
        return f"~{s * 1e3:.3f} (disturbed)"
    sp = t.spread(t.secs(name))
    return f"{s * 1e3:.3f}" + (f" ±{sp:.0%}" if sp is not None else "")


def _rate_cell(t: Timing, name: str, per_second: Callable[[float], float], fmt: str) -> str:
    """bytes/s or images/s from the median time, "~" where every round was disturbed."""
    s, clean = t.median_any_s(name)
    if s is None:
        return "-"
    return ("" if clean else "~") + format(per_second(s), fmt)


def _with_backend(env: str | None, fn: Callable) -> Callable:
    def run():
        old = os.environ.get("FASTDIFF_BACKEND")
        if env:
            os.environ["FASTDIFF_BACKEND"] = env
        else:
            os.environ.pop("FASTDIFF_BACKEND", None)
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop("FASTDIFF_BACKEND", None)
            else:
                os.environ["FASTDIFF_BACKEND"] = old
    return run


def _loop_rows(device: torch.device, repeat: int, quick: bool, budget_s: float, threads: int):
    """End-to-end rows: a DDIM loop of the bundled model with every op on the reference vs on "auto"."""
    from fastdiff.app import checkpoint as ckpt
    from fastdiff.app import jobs
    from fastdiff.samplers.ddim import OPTIONS
    from fastdiff.run.sampling import schedule_and_config

    path = ckpt.bundled_checkpoint()
    if not os.path.isfile(path):
        return [], ["DDIM loop: skipped (bundled checkpoint missing)"]
    model, meta = ckpt.load_checkpoint(path, device=device)
    steps, B = (5, 16) if quick else (20, 64)
    cfg = jobs.SampleConfig("ddim", steps, 0.0, 0, "float32", B)
    sch = meta["scheduler"]
    schedule, _ = schedule_and_config(sch or None)
    opts = {k: sch[k] for k in OPTIONS if k in sch}
    c, s = meta["config"]["in_channels"], meta["config"]["sample_size"]
    idx = list(range(B))

    def batch():
        return jobs.sample_batch(model, idx, cfg, schedule, opts, (c, s, s), device)

    fns = {"reference": _with_backend("torch", batch), "auto": _with_backend(None, batch)}
    t = interleave(fns, device, min_rounds=max(3, repeat // 2), max_rounds=max(6, 2 * repeat), budget_s=budget_s,
                   threads=threads)
    rows = []
    for name in fns:
        rows.append((f"DDIM {steps} steps, bundled UNet2D", f"{B}×{c}×{s}×{s}", name, _ms_cell(t, name),
                     _rate_cell(t, name, lambda sec: B / sec, ".0f"),
                     "1" if name == "reference" else _ratio_cell(t, name, max(3, repeat // 2))))
    return rows, [f"DDIM loop: {t.clean} clean of {t.rounds} interleaved rounds in {t.seconds:.1f} s"]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def choose_threads(device: torch.device, threads: int | None) -> tuple[int, str]:
    """Set and return the intra-op thread count, with the reason: --threads if given; on a CPU that other jobs already
    saturate (1-minute load >= cores) 1, since several OpenMP threads then spin at each barrier while their siblings
    wait for a core; else torch's default."""
    if threads:
        torch.set_num_threads(threads)
        return threads, "--threads"
    n = torch.get_num_threads()
    load, cores = load_average(), os.cpu_count() or 1
    if device.type == "cpu" and n > 1 and load is not None and load >= cores:
        torch.set_num_threads(1)
        return 1, f"the CPU is busy (load {load:.1f} on {cores} cores): 1 thread; --threads N to choose"
    return n, "torch's default"


def _table(header, rows, out) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    out("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    out("  ".join("-" * w for w in widths))
    for r in rows:
        out("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def run(device: torch.device, repeat: int = 5, quick: bool = False, out=print, threads: int | None = None,
        budget_s: float | None = None) -> int:
    """Print the tables. repeat: the least number of clean interleaved rounds per figure (more are run until the
    ratios settle). budget_s: wall seconds per op case (default 4, or 30 for the end-to-end loop; quick: half)."""
    import platform

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    nthreads, why = choose_threads(device, threads)
    load0, cores = load_average(), os.cpu_count() or 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name() or platform.processor()
    out(f"fastdiff bench on {device} ({name}), torch {torch.__version__}, triton {tv}")
    out(f"threads: {nthreads} ({why}); load: "
        + (f"{load0:.2f} on {cores} cores at the start" if load0 is not None else "unknown on this platform"))
    out("backends:")
    for b, st in _backend.backends().items():
        out(f"  {b:7s} {'yes' if st['available'] else 'no ':3s}  {st['why']}")
    op_budget = budget_s if budget_s is not None else (2.0 if quick else 4.0)
    rows, notes, done = [], [], set()
    dropped = total = 0
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
        ok = {}
        for b, fn in fns.items():  # a backend that fails is listed with the reason, not timed
            try:
                fn()
                ok[b] = fn
            except Exception as e:
                rows.append((label, "×".join(map(str, shape)), b, "-", "-", f"failed: {type(e).__name__}: {e}"))
        if "reference" not in ok:
            continue
        t = interleave(ok, device, min_rounds=repeat, max_rounds=max(8 * repeat, 40), budget_s=op_budget,
                       threads=nthreads)
        dropped, total = dropped + t.dropped, total + t.rounds
        for b in ok:
            rows.append((label, "×".join(map(str, shape)), b, _ms_cell(t, b),
                         _rate_cell(t, b, lambda sec: nbytes / sec / 1e9, ".1f"),
                         "1" if b == "reference" else _ratio_cell(t, b, repeat)))
    out("")
    out("Ops (median of the clean interleaved rounds; GB/s = bytes the op must move / median time):")
    _table(("op", "shape (fp32)", "backend", "ms", "GB/s", "vs reference"), rows, out)
    try:
        lrows, lnotes = _loop_rows(device, repeat, quick, budget_s if budget_s is not None else
                                   (15.0 if quick else 30.0), nthreads)
        notes += lnotes
        if lrows:
            out("")
            out("End to end (one batch of the bundled model; the model's convolutions dominate on a CPU):")
            _table(("loop", "batch", "ops on", "ms per batch", "images/s", "vs reference"), lrows, out)
    except Exception as e:
        notes.append(f"DDIM loop: failed ({type(e).__name__}: {e})")
    load1 = load_average()
    notes.append(f"ops: {total - dropped} clean of {total} interleaved rounds; a round is dropped when a call got "
                 f"less than {MIN_CPU_SHARE:.0%} of its threads' CPU time (descheduled by another job)"
                 if device.type == "cpu" else f"ops: {total} interleaved rounds")
    if load1 is not None:
        notes.append(f"load: {load1:.2f} on {cores} cores at the end")
    out("")
    out("notes:")
    for n in notes:
        out(f"  {n}")
    out("")
    out(f"vs reference: the median over rounds of (reference time / backend time) within one round, ± half its "
        f"inter-quartile range; 'noisy' where that spread stayed above {NOISY_SPREAD:.0%} or too few rounds were "
        "clean (rerun on a quieter machine, or with --threads 1).")
    out("bytes per op: DDIM step 3·N·4 (read x, o; write x'); GroupNorm+SiLU 2·N·4 (read x, write y); "
        "attention 4·B·L·D·4 (read q, k, v; write o). 'reference' is the plain-PyTorch *_ref function.")
    return 0
