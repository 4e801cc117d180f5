"""Core speed bars (issue 18), on the CPU, against whichever fastdiff is imported.

    python3 benchmarks/bench_core.py [--threads 1,2] [--rounds 7] [--json PATH] [--only a,b,c]
    (a "before" tree: cd /tmp && PYTHONPATH=/tmp/before python3 /work/main/benchmarks/bench_core.py ...)

a. sampling-loop step at 16M float32 elements (x of shape (1, 4, 2048, 2048)), trivial model (returns a preallocated
   tensor; its cost is measured and reported), DDIM (fastdiff.ddim_sample) and DPM-Solver++(2M) (fastdiff.sample,
   sampler="dpmsolver++", solver_order 2), backend="cpp". Per-step time = (T(N steps) − T(M steps)) / (N − M), which
   removes the fixed costs (x_T copy, plan, buffers). Both N and M >= 15 so that diffusers' lower_order_final (order
   1 at the end when steps < 15) is the same in both. Bytes per step, counted (float32, n elements):
     DDIM η=0      read x, o; write out                              = 3·4n
     DPM-Solver++ 2M (steady state) read x, o, one history d; write out, the new history d = 5·4n
   effective bandwidth = bytes / per-step time, compared with torch.add(a, b, out=c) on n elements (3·4n bytes).
   Bar: ratio >= 0.8. Run at each --threads count.
b. eager per-step host overhead at batch 1, x (1, 4, 8, 8), trivial model: per-step time of fastdiff.ddim_sample and
   of fastdiff.sample(sampler="dpmsolver++") minus a bare loop `for t in ts: o = model(x, t); <raw op>(...)` with the
   same raw op on preallocated buffers (DDIM: torch.ops.fastdiff.sampler_step_out where it exists, else the multistep
   op; DPM-Solver++: fastdiff.ops.multistep.resolve_op("cpp")). Bar: within 5 µs.
c. the fused step against its plain-PyTorch reference at 1M float32 elements (1, 4, 512, 512): DDIM step
   (fastdiff.ops.sampler_step.sampler_step, out= given) and DPM-Solver++ 2M step (fastdiff.ops.multistep.multistep_step
   with one history tensor, out= and d_out= given), backend="cpp" vs backend="torch"; ratio = t_torch / t_cpp.

Rounds are interleaved (every candidate once per round, the order rotated), medians reported (per-step times: the
median over rounds of that round's N-step − M-step difference); the load average is
printed before and after each section, and torch's thread count with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import fastdiff


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return "n/a"


def interleaved(cands: dict, rounds: int, warmup: int = 1) -> dict:
    """{name: fn} -> {name: [seconds per round]}; each round runs every fn once, order rotated per round."""
    names = list(cands)
    for _ in range(warmup):
        for n in names:
            cands[n]()
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            cands[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def med(v):
    return statistics.median(v)


class Const(torch.nn.Module):
    """A trivial model: returns a preallocated tensor (no work beyond the call)."""

    def __init__(self, o):
        super().__init__()
        self.o = o

    def forward(self, x, t):
        return self.o


# ---------------------------------------------------------------------------------------------------------------------
# a. loop step at 16M elements

def section_a(args, threads: int) -> dict:
    torch.set_num_threads(threads)
    shape = (1, 4, 2048, 2048)
    n = 1
    for s in shape:
        n *= s
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(shape, generator=g)
    o = torch.randn(shape, generator=g) * 0.1
    model = Const(o)
    a, b, c = torch.randn(shape), torch.randn(shape), torch.empty(shape)
    N, M = args.a_steps
    t = torch.full((1,), 500, dtype=torch.long)

    def ddim(steps):
        return lambda: fastdiff.ddim_sample(model, steps, x_T=x_T, backend="cpp")

    def dpm(steps):
        return lambda: fastdiff.sample(model, steps, sampler="dpmsolver++", solver_order=2, x_T=x_T, backend="cpp")

    cands = {"ddim_N": ddim(N), "ddim_M": ddim(M), "dpm_N": dpm(N), "dpm_M": dpm(M),
             "add": lambda: [torch.add(a, b, out=c) for _ in range(10)],
             "model": lambda: [model(x_T, t) for _ in range(1000)]}
    load0 = loadavg()
    tm = interleaved(cands, args.rounds)
    load1 = loadavg()
    t_add = med(tm["add"]) / 10
    bw_add = 12 * n / t_add
    t_model = med(tm["model"]) / 1000
    out = {"threads": torch.get_num_threads(), "shape": list(shape), "numel": n, "steps_N_M": [N, M],
           "rounds": args.rounds, "loadavg_before": load0, "loadavg_after": load1,
           "add_s": t_add, "add_GBps": bw_add / 1e9, "model_call_s": t_model}
    for name, bytes_per_elem in (("ddim", 12), ("dpmsolver++2M", 20)):
        key = "ddim" if name == "ddim" else "dpm"
        per_step = med([x - y for x, y in zip(tm[f"{key}_N"], tm[f"{key}_M"])]) / (N - M)  # paired per round
        per_step_net = per_step - t_model
        bw = bytes_per_elem * n / per_step_net
        out[name] = {"step_s": per_step, "step_minus_model_s": per_step_net, "bytes_per_step": bytes_per_elem * n,
                     "GBps": bw / 1e9, "ratio_to_add": bw / bw_add, "bar": 0.8, "meets_bar": bw / bw_add >= 0.8,
                     f"call_{N}_steps_s": med(tm[f"{key}_N"]), f"call_{M}_steps_s": med(tm[f"{key}_M"])}
    return out


# ---------------------------------------------------------------------------------------------------------------------
# b. per-step host overhead at batch 1

def _v_arg() -> tuple:
    """The raw multistep op's `v` argument (learned variances), where the op has one (after issue 18's merge)."""
    try:
        schema = torch.ops.fastdiff.multistep_step_.default._schema
    except (AttributeError, RuntimeError):
        return ()
    return (None,) if any(a.name == "v" for a in schema.arguments) else ()


_V = _v_arg()


def _bare_ddim_runner(model, x_T, steps):
    """The bare DDIM loop with the raw op the library's loop uses, on preallocated buffers. Returns (fn(steps), op)."""
    from fastdiff.ops import sampler_step as ss
    coefs = [torch.tensor(ss.step_coefs("ddim", 0.5 + 0.4 * i / 100, 0.5 + 0.4 * (i + 1) / 100),
                          dtype=torch.float64) for i in range(steps)]
    ts = [torch.full((x_T.shape[0],), 999 - i, dtype=torch.long) for i in range(steps)]
    bufs = [torch.empty_like(x_T), torch.empty_like(x_T)]
    raw = getattr(torch.ops.fastdiff, "sampler_step_out", None)
    if raw is not None:
        raw = raw.default

        def run(k):
            x = bufs[0]
            x.copy_(x_T)
            for i in range(k):
                o = model(x, ts[i])
                out = bufs[1] if x is bufs[0] else bufs[0]
                raw(x, o, None, None, None, None, None, coefs[i], 0, out, None)
                x = out
            return x
        return run, "torch.ops.fastdiff.sampler_step_out"
    # no sampler_step op (after issue 18's single fused op): DDIM through the multistep op, d = x̂0, y = A·x̂0 + B·ε̂
    from fastdiff.ops import multistep as ms
    op = ms.resolve_op("cpp", x_T.device)
    rows = []
    for c in coefs:
        cl = c.tolist()
        k = ss.COEF
        rows.append(torch.tensor(ms.coef_row(p=cl[k["p"]], q=cl[k["q"]], yd=cl[k["A"]], yo=cl[k["B"]]),
                                 dtype=torch.float64))

    def run(k):
        x = bufs[0]
        x.copy_(x_T)
        for i in range(k):
            o = model(x, ts[i])
            out = bufs[1] if x is bufs[0] else bufs[0]
            op(x, o, None, [], None, None, *_V, None, rows[i], 0, out, None, None)
            x = out
        return x
    return run, f"fastdiff.ops.multistep.resolve_op('cpp') = {op}"


def _bare_dpm_runner(model, x_T, steps):
    """The bare DPM-Solver++ 2M loop: raw multistep op, one history slot read, the new d written to the other."""
    from fastdiff.ops import multistep as ms
    op = ms.resolve_op("cpp", x_T.device)
    rows = [torch.tensor(ms.coef_row(p=1.0, q=-0.5, yx=0.5, yd=0.4, yh0=0.1), dtype=torch.float64)
            for _ in range(steps)]
    ts = [torch.full((x_T.shape[0],), 999 - i, dtype=torch.long) for i in range(steps)]
    bufs = [torch.empty_like(x_T), torch.empty_like(x_T)]
    hist = torch.zeros((2, *x_T.shape), dtype=x_T.dtype)
    slots = [hist[0], hist[1]]

    def run(k):
        x = bufs[0]
        x.copy_(x_T)
        for i in range(k):
            o = model(x, ts[i])
            out = bufs[1] if x is bufs[0] else bufs[0]
            op(x, o, None, [slots[(i + 1) % 2]], None, None, *_V, None, rows[i], 0, out, None, slots[i % 2])
            x = out
        return x
    return run, f"fastdiff.ops.multistep.resolve_op('cpp') = {op}"


def section_b(args) -> dict:
    torch.set_num_threads(args.threads[0])
    shape = (1, 4, 8, 8)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(shape, generator=g)
    model = Const(torch.randn(shape, generator=g) * 0.1)
    N, M = args.b_steps
    bare_ddim, ddim_op = _bare_ddim_runner(model, x_T, N)
    bare_dpm, dpm_op = _bare_dpm_runner(model, x_T, N)
    reps = args.b_reps

    def rep(f):
        return lambda: [f() for _ in range(reps)]

    cands = {
        "ddim_N": rep(lambda: fastdiff.ddim_sample(model, N, x_T=x_T, backend="cpp")),
        "ddim_M": rep(lambda: fastdiff.ddim_sample(model, M, x_T=x_T, backend="cpp")),
        "dpm_N": rep(lambda: fastdiff.sample(model, N, sampler="dpmsolver++", solver_order=2, x_T=x_T, backend="cpp")),
        "dpm_M": rep(lambda: fastdiff.sample(model, M, sampler="dpmsolver++", solver_order=2, x_T=x_T, backend="cpp")),
        "bare_ddim_N": rep(lambda: bare_ddim(N)), "bare_ddim_M": rep(lambda: bare_ddim(M)),
        "bare_dpm_N": rep(lambda: bare_dpm(N)), "bare_dpm_M": rep(lambda: bare_dpm(M)),
    }
    load0 = loadavg()
    tm = interleaved(cands, args.rounds * 3, warmup=2)
    load1 = loadavg()

    def per_step(k):  # median over rounds of the same round's (N-step − M-step) difference
        return med([a - b for a, b in zip(tm[f"{k}_N"], tm[f"{k}_M"])]) / reps / (N - M)

    out = {"threads": torch.get_num_threads(), "shape": list(shape), "steps_N_M": [N, M], "rounds": args.rounds * 3,
           "calls_per_round": reps, "loadavg_before": load0, "loadavg_after": load1,
           "bare_ddim_op": ddim_op, "bare_dpm_op": dpm_op}
    for name, lib, bare in (("ddim", "ddim", "bare_ddim"), ("dpmsolver++2M", "dpm", "bare_dpm")):
        s_lib, s_bare = per_step(lib), per_step(bare)
        out[name] = {"step_us": s_lib * 1e6, "bare_step_us": s_bare * 1e6, "overhead_us": (s_lib - s_bare) * 1e6,
                     "bar_us": 5.0, "meets_bar": (s_lib - s_bare) * 1e6 <= 5.0,
                     "fixed_cost_per_call_us": (med(tm[f"{lib}_M"]) / reps - M * s_lib) * 1e6}
    return out


# ---------------------------------------------------------------------------------------------------------------------
# c. fused step vs plain-PyTorch reference

def section_c(args) -> dict:
    torch.set_num_threads(args.threads[0])
    from fastdiff.ops import multistep as ms
    from fastdiff.ops import sampler_step as ss
    shape = (1, 4, 512, 512)
    g = torch.Generator().manual_seed(0)
    x, o, h = (torch.randn(shape, generator=g) for _ in range(3))
    out, d = torch.empty_like(x), torch.empty_like(x)
    c_ddim = torch.tensor(ss.step_coefs("ddim", 0.5, 0.6), dtype=torch.float64)
    c_dpm = torch.tensor(ms.coef_row(p=1.0, q=-0.5, yx=0.5, yd=0.4, yh0=0.1), dtype=torch.float64)
    reps = 20

    def rep(f):
        return lambda: [f() for _ in range(reps)]

    cands = {
        "ddim_cpp": rep(lambda: ss.sampler_step(x, o, c_ddim, out=out, backend="cpp")),
        "ddim_torch": rep(lambda: ss.sampler_step(x, o, c_ddim, out=out, backend="torch")),
        "dpm_cpp": rep(lambda: ms.multistep_step(x, o, c_dpm, hist=[h], out=out, d_out=d, backend="cpp")),
        "dpm_torch": rep(lambda: ms.multistep_step(x, o, c_dpm, hist=[h], out=out, d_out=d, backend="torch")),
    }
    load0 = loadavg()
    tm = interleaved(cands, args.rounds * 2)
    load1 = loadavg()
    res = {"threads": torch.get_num_threads(), "shape": list(shape), "numel": x.numel(), "rounds": args.rounds * 2,
           "loadavg_before": load0, "loadavg_after": load1}
    for name, k in (("ddim_step (sampler_step)", "ddim"), ("dpmsolver++2M_step (multistep_step)", "dpm")):
        tc, tt = med(tm[f"{k}_cpp"]) / reps, med(tm[f"{k}_torch"]) / reps
        res[name] = {"cpp_us": tc * 1e6, "torch_us": tt * 1e6, "ratio_torch_over_cpp": tt / tc}
    return res


# ---------------------------------------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default=None,
                   help="comma-separated torch thread counts for (a) (default: 1 and torch's default); (b) and (c) "
                        "use the first")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--a-steps", default="36,16", help="N,M for (a) (both >= 15)")
    p.add_argument("--b-steps", default="60,20", help="N,M for (b)")
    p.add_argument("--b-reps", type=int, default=5, help="sampling calls per round in (b)")
    p.add_argument("--only", default="a,b,c")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    default_threads = torch.get_num_threads()
    args.threads = [int(v) for v in args.threads.split(",")] if args.threads else sorted({1, default_threads})
    args.a_steps = [int(v) for v in args.a_steps.split(",")]
    args.b_steps = [int(v) for v in args.b_steps.split(",")]
    only = set(args.only.split(","))

    root = os.path.dirname(os.path.dirname(os.path.abspath(fastdiff.__file__)))
    try:
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except Exception:
        commit = None
    meta = {"fastdiff": fastdiff.__file__, "commit": commit, "torch": torch.__version__,
            "torch_default_threads": default_threads, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
            "python": sys.version.split()[0], "loadavg_start": loadavg(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        with open("/proc/cpuinfo") as f:
            meta["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), meta["cpu"])
    except OSError:
        pass
    print(f"fastdiff {meta['fastdiff']} ({commit}); torch {torch.__version__}, default threads {default_threads}, "
          f"OMP_NUM_THREADS={meta['OMP_NUM_THREADS']}; {meta['cpu']}, {meta['nproc']} CPUs")
    print(f"loadavg: {meta['loadavg_start']}")
    res = {"meta": meta}

    if "a" in only:
        res["a"] = []
        for th in args.threads:
            r = section_a(args, th)
            res["a"].append(r)
            print(f"\n(a) loop step at {r['numel'] / 2**20:.0f}M float32, threads={r['threads']}, steps "
                  f"({r['steps_N_M'][0]}−{r['steps_N_M'][1]}), {r['rounds']} rounds; loadavg {r['loadavg_before']} "
                  f"-> {r['loadavg_after']}")
            print(f"    torch.add out=: {r['add_s'] * 1e3:.2f} ms = {r['add_GBps']:.2f} GB/s (12 B/elem); trivial "
                  f"model call {r['model_call_s'] * 1e6:.2f} µs (subtracted)")
            for k in ("ddim", "dpmsolver++2M"):
                v = r[k]
                print(f"    {k:14s} step {v['step_s'] * 1e3:7.2f} ms, {v['bytes_per_step'] / r['numel']:.0f} B/elem "
                      f"-> {v['GBps']:.2f} GB/s = {v['ratio_to_add']:.2f}x add  (bar 0.8: "
                      f"{'ok' if v['meets_bar'] else 'MISSED'})")
    if "b" in only:
        r = section_b(args)
        res["b"] = r
        print(f"\n(b) per-step host overhead, x {tuple(r['shape'])}, threads={r['threads']}, steps "
              f"({r['steps_N_M'][0]}−{r['steps_N_M'][1]}), {r['rounds']} rounds × {r['calls_per_round']} calls; "
              f"loadavg {r['loadavg_before']} -> {r['loadavg_after']}")
        print(f"    bare DDIM loop op: {r['bare_ddim_op']}; bare DPM loop op: {r['bare_dpm_op']}")
        for k in ("ddim", "dpmsolver++2M"):
            v = r[k]
            print(f"    {k:14s} step {v['step_us']:6.2f} µs, bare loop {v['bare_step_us']:6.2f} µs -> overhead "
                  f"{v['overhead_us']:+.2f} µs (bar 5: {'ok' if v['meets_bar'] else 'MISSED'}); fixed cost per call "
                  f"{v['fixed_cost_per_call_us']:.0f} µs")
    if "c" in only:
        r = section_c(args)
        res["c"] = r
        print(f"\n(c) fused step vs plain-PyTorch reference, {r['numel'] / 2**20:.0f}M float32, threads={r['threads']}, "
              f"{r['rounds']} rounds; loadavg {r['loadavg_before']} -> {r['loadavg_after']}")
        for k, v in r.items():
            if isinstance(v, dict):
                print(f"    {k:36s} cpp {v['cpp_us']:8.1f} µs, torch {v['torch_us']:8.1f} µs -> "
                      f"{v['ratio_torch_over_cpp']:.2f}x")
    res["meta"]["loadavg_end"] = loadavg()
    print(f"\nloadavg: {res['meta']['loadavg_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")
        print(f"written: {args.json}")


if __name__ == "__main__":
    main()
