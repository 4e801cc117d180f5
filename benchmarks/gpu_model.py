"""GPU cost on paper: kernels launched, bytes moved and GEMM/conv FLOPs, counted on the CPU, and the time they predict
on an H100 SXM and an H200. These are PREDICTIONS from published figures, not measurements.

    python benchmarks/gpu_model.py --markdown            # the tables of docs/benchmarks.md ("Predicted (not measured)")
    python benchmarks/gpu_model.py --json out.json       # the same numbers for scripts/gpu_check.sh
    python benchmarks/gpu_model.py --ops                 # also every kernel of each step, the U-Nets' by op
    python benchmarks/gpu_model.py --measured bench.json # predicted beside a pytest-benchmark JSON's medians

What is counted (a TorchDispatchMode sees every ATen op and every fastdiff op a call makes):
  (a) one sampling step: fastdiff's fused DDIM step (fastdiff.ops.multistep with the inputs a sampling loop passes:
      x, the model output, row i of the coefficient table, out=), diffusers' DDIMScheduler.step (η = 0) and
      DPMSolverMultistepScheduler.step (DPM-Solver++(2M), counted after two warm-up steps so the multistep branch runs;
      its first step, which looks its timestep up with `nonzero` and `.item()`, is a row of its own), and fastdiff's
      fused multistep step for DPM-Solver++(2M) (fastdiff.ops.multistep if it is importable, else its contract: read x,
      the model output and one history tensor, write out and d_out = 5 passes, one kernel; the output says which);
  (b) one U-Net forward: fastdiff.nn.UNet2D vs diffusers' UNet2DModel, google/ddpm-cifar10-32 architecture (random
      weights on the meta device: nothing is downloaded, nothing is computed), fp16, batch 1 / 64 / 256.
Device tensors are meta tensors (shapes and dtypes only), so any size counts in milliseconds; a CPU tensor mixed into
an op on the device (diffusers keeps its ᾱ and σ tables on the CPU) is a scalar kernel argument: 0 bytes. An op with
no device tensor is a host op (CPU work between launches: counted, not timed); `.item()`, `nonzero`, `is_nonzero`
on a device tensor are device→host syncs (counted separately).

The cost model, per kernel k: t_k = launches_k · L + max(bytes_k / BW, flops_k / P); a step or a forward is Σ_k t_k
(kernels run one after another, as on one stream). L = 2.5 µs per eager launch or 1.3 µs per CUDA-graph node; BW:
H100 SXM 3.35 TB/s (HBM3 spec), H200 4.8 TB/s (spec) and 4.3 TB/s (a published measured copy rate); P = 989 TFLOP/s,
the dense fp16 tensor-core peak of both (published; fp32: PEAKS below). bytes_k = every tensor the op reads plus
every tensor it writes (a broadcast dimension counted once, views and allocations free); flops_k = 2·M·N·K for GEMMs
and convolutions (attention: its two GEMMs), 0 for element-wise ops. Peak bandwidth and peak FLOP/s are upper
bounds on what a kernel achieves, so each t_k is a lower bound on its GPU time; host ops and syncs are not in the
time.
Launches per op: one per ATen op, except ATen's CUDA GroupNorm (three: moments, fused parameters, normalise; the input
is read twice), a convolution as PyTorch's cuDNN path runs it (the bias is a separate add_; channels_last when the
input or the weight suggests it, the other one copied to that layout first; the meta kernel returns NCHW whatever its
inputs, so the counter gives the output cuDNN's layout) and fastdiff's group_norm_silu (one kernel when gns::plan in
csrc/include/group_norm_silu_math.h does not split a group, else statistics + merge + apply with the input read twice;
planned here for 132 SMs, the SM count of both GPUs). Scaled-dot-product attention is one kernel (flash /
memory-efficient on CUDA; on the meta device PyTorch would run its math decomposition, which is not what a GPU runs).
Kernels cuDNN runs inside a convolution (layout transforms, split-K reductions) are not counted.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten

# ---- published inputs (not measured here) ------------------------------------------------------------------------
LAUNCH_EAGER_S = 2.5e-6  # per eager kernel launch
LAUNCH_GRAPH_S = 1.3e-6  # per CUDA-graph node
FP16_PEAK = 989e12  # dense fp16/bf16 tensor-core FLOP/s, H100 SXM and H200
# float32 (only with --dtype float32 or a float32 benchmark in --measured): PyTorch's defaults run convolutions in TF32
# (torch.backends.cudnn.allow_tf32 = True: 495 TFLOP/s dense) and GEMMs in plain FP32 (matmul.allow_tf32 = False:
# 67 TFLOP/s); attention in fp32 is taken at the FP32 rate
PEAKS = {"fp16": FP16_PEAK, "tf32": 495e12, "fp32": 67e12}
DEVICES = OrderedDict([
    ("H100 SXM", dict(bw=3.35e12, peaks=PEAKS, note="3.35 TB/s HBM3 (spec)")),
    ("H200 spec", dict(bw=4.8e12, peaks=PEAKS, note="4.8 TB/s HBM3e (spec)")),
    ("H200 copy", dict(bw=4.3e12, peaks=PEAKS, note="~4.3 TB/s (published measured copy)")),
])
SMS = 132  # SMs of an H100 SXM and of an H200: fastdiff's group_norm_silu plans its split for 8 blocks per SM


# ---- counting ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Kernel:
    op: str
    launches: int
    bytes: int
    flops: int = 0
    math: str = "fp16"  # which peak of PEAKS its FLOPs run at

    def seconds(self, dev: dict, launch_s: float) -> float:
        return self.launches * launch_s + max(self.bytes / dev["bw"], self.flops / dev["peaks"][self.math])


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the elements a kernel addresses in `t`: a broadcast (stride-0) dimension counts once."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


_FREE = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default, aten.new_empty.default,
         aten.new_empty_strided.default, aten.detach.default, aten.alias.default, aten.lift_fresh.default,
         aten._unsafe_view.default}  # allocations and views (_unsafe_view is a view without the schema's tag)
_SYNC = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}  # a device→host read
_SYNC_KERNEL = {aten.nonzero.default}  # a kernel whose output size the host must read back


def _tensors(v):
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _tensors(x)]
    return []


def _flops(func, args, out) -> int:
    if func in (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default):
        a, b = (args[0], args[1]) if func in (aten.mm.default, aten.bmm.default) else (args[1], args[2])
        return 2 * a.shape[:-1].numel() * b.shape[-1] * a.shape[-1]
    if func is aten.convolution.default:
        w, transposed = args[1], args[6]
        per_out = w.shape[1:].numel() if not transposed else w.shape[0] * w.shape[2:].numel() // max(args[8], 1)
        return 2 * out.numel() * per_out
    return 0


def suggests_channels_last(t: torch.Tensor) -> bool:
    """c10's is_channels_last_strides_2d: what Tensor.suggest_memory_format() reads for a 4-d tensor."""
    if t.dim() != 4:
        return False
    m = 0
    for d in (1, 3, 2, 0):
        if t.shape[d] == 0 or t.stride(d) < m or (d == 0 and m == t.stride(1)):
            return False
        m = t.stride(d) * (t.shape[d] if t.shape[d] > 1 else 1)
    return True


def gns_plan_split(N: int, C: int, HW: int, G: int, channels_last: bool, target_blocks: int = 8 * SMS) -> int:
    """`split` of gns::plan (csrc/include/group_norm_silu_math.h): 1 means one fused kernel."""
    unit = HW * C if channels_last else (C // G) * HW
    row = C if channels_last else 1
    units = N if channels_last else N * G
    split = -(-target_blocks // units)
    split = min(split, max(unit // 512, 1))  # kMinSlice
    split = max(split, -(-unit // 16384), 1)  # kMaxSlice
    steps = unit // row
    slice_ = -(-steps // split)
    if not channels_last:
        slice_ = -(-slice_ // 8) * 8
    slice_ = max(slice_, 1)
    return max(-(-steps // slice_), 1)


class Counter(TorchDispatchMode):
    """Records a Kernel per device op; counts host ops and device→host syncs. Device tensors: meta or CUDA tensors,
    and CPU tensors passed to `resident` (then everything computed from them), which stand for GPU-resident ones."""

    def __init__(self, resident=()):
        super().__init__()
        self.kernels: list[Kernel] = []
        self.host_ops: list[str] = []
        self.syncs: list[str] = []
        self._resident = WeakIdKeyDictionary()
        for t in resident:
            self._resident[t] = True
        self._paused = False

    def on_device(self, t: torch.Tensor) -> bool:
        return t.device.type in ("meta", "cuda") or t in self._resident

    @contextlib.contextmanager
    def paused(self):
        self._paused, old = True, self._paused
        try:
            yield
        finally:
            self._paused = old

    def add(self, op: str, launches: int, nbytes: int, flops: int = 0, dtype=torch.float16):
        math = "fp32" if dtype == torch.float32 else "fp16"
        if math == "fp32" and op == "convolution":
            math = "tf32"
        self.kernels.append(Kernel(op, launches, int(nbytes), int(flops), math))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._paused:
            return out
        sch = func._schema
        bound = [(a, args[i] if i < len(args) else kwargs[a.name]) for i, a in enumerate(sch.arguments)
                 if i < len(args) or a.name in kwargs]
        ins = [t for _, v in bound for t in _tensors(v)]
        outs = _tensors(out)
        dev = any(self.on_device(t) for t in ins + outs)
        if dev:
            for t in outs:
                if t.device.type == "cpu":
                    self._resident[t] = True
        name = str(func.overloadpacket.__name__) if func.namespace == "aten" else f"{func.namespace}.{func._opname}"
        if func.is_view or func in _FREE:
            return out
        if not dev:
            self.host_ops.append(name)
            return out
        if func in _SYNC:
            self.syncs.append(name)
            return out
        if func in _SYNC_KERNEL:
            self.syncs.append(name)
        # bytes: tensors read (every tensor argument except write-only outputs) + tensors written (mutated arguments,
        # and returned tensors that are not aliases of an argument); CPU 0-dim tensors are scalar kernel arguments
        def nb(t):
            return 0 if (t.dim() == 0 and not self.on_device(t)) else tensor_bytes(t)

        read = write = 0
        for a, v in bound:
            mutated = a.alias_info is not None and a.alias_info.is_write
            for t in _tensors(v):
                if mutated:
                    write += nb(t)
                if not mutated or a.name == "self":  # in-place self is read and written; out= is written only
                    read += nb(t)
        for r, t in zip(sch.returns, out if isinstance(out, (list, tuple)) else [out]):
            if r.alias_info is None:
                write += sum(nb(x) for x in _tensors(t))
        launches, bias_add = 1, None
        if func is aten.convolution.default and not args[6] and out.dim() == 4:
            out = self._cudnn_conv(args, out, nb)
            if args[2] is not None:  # the conv kernel does not read the bias; the add_ after it does
                read -= nb(args[2])
                bias_add = 2 * nb(out) + nb(args[2])
        elif func is aten.native_group_norm.default:  # ATen CUDA: moments, fused params, normalise (x read twice)
            launches, read = 3, read + nb(args[0])
        elif name == "fastdiff.group_norm_silu":
            x, G = args[0], args[4]
            cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
            if gns_plan_split(x.shape[0], x.shape[1], x.shape[2:].numel(), G, cl) > 1:
                launches, read = 3, read + nb(x)
        self.add(name, launches, read + write, _flops(func, args, out), outs[0].dtype if outs else torch.float16)
        if bias_add is not None:
            self.add("convolution: bias add_", 1, bias_add, 0, out.dtype)
        return out


    def _cudnn_conv(self, args, out, nb):
        """PyTorch's cuDNN path of a 2-d convolution (Convolution.cpp `_convolution`, cudnn/Conv): the layout is
        channels_last when the input or the weight suggests it (cudnn_conv_suggest_memory_format), an input or weight
        in the other layout is copied first, the bias is a separate in-place add (recorded by the caller). The meta
        kernel returns NCHW whatever the inputs: the output is given the layout cuDNN returns. Records the copies."""
        x, w = args[0], args[1]
        cl = suggests_channels_last(x) or suggests_channels_last(w)
        fmt = torch.channels_last if cl else torch.contiguous_format
        for t, what in ((x, "input"), (w, "weight")):
            if not t.is_contiguous(memory_format=fmt):
                self.add(f"convolution: {what} to {'channels_last' if cl else 'NCHW'}", 1, 2 * nb(t), 0, t.dtype)
        return out.contiguous(memory_format=fmt) if cl else out


class _SDPA(TorchFunctionMode):
    """F.scaled_dot_product_attention as the one fused kernel a GPU runs (q, k, v read, output written)."""

    def __init__(self, counter: Counter):
        super().__init__()
        self.c = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        with self.c.paused():
            out = func(*args, **kwargs)
        q, k, v = (args[i] if i < len(args) else kwargs[n] for i, n in enumerate(("query", "key", "value")))
        bh = q.shape[:-2].numel()
        flops = 2 * bh * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        self.c.add("scaled_dot_product_attention", 1, sum(map(tensor_bytes, (q, k, v, out))), flops, q.dtype)
        return out


@contextlib.contextmanager
def counting(resident=()):
    c = Counter(resident)
    with c, _SDPA(c), torch.no_grad():
        yield c


def summarize(c: Counter, what: str, shape, dtype, note: str = "") -> dict:
    row = OrderedDict(what=what, shape=list(shape), dtype=str(dtype).replace("torch.", ""),
                      kernels=sum(k.launches for k in c.kernels), ops=len(c.kernels),
                      bytes=sum(k.bytes for k in c.kernels), flops=sum(k.flops for k in c.kernels),
                      host_ops=len(c.host_ops), syncs=list(c.syncs), note=note)
    for name, dev in DEVICES.items():
        row[name] = dict(eager_us=1e6 * sum(k.seconds(dev, LAUNCH_EAGER_S) for k in c.kernels),
                         graph_us=1e6 * sum(k.seconds(dev, LAUNCH_GRAPH_S) for k in c.kernels))
    row["kernel_list"] = [dataclasses.asdict(k) for k in c.kernels]
    return row


# ---- (a) one sampling step ---------------------------------------------------------------------------------------
STEPS, STEP_I = 50, 10  # a 50-step loop, step 10 (any mid-loop step counts the same)
FUSED_DDIM = "fastdiff multistep_step (DDIM η=0 row, fused)"
DIFFUSERS_DDIM = "diffusers DDIMScheduler.step (η=0)"
DPM_FIRST = "diffusers DPMSolverMultistep.step, first step (1st order + timestep lookup)"
DPM_2M = "diffusers DPMSolverMultistep.step (2M)"
FUSED_2M = "fastdiff multistep (DPM-Solver++ 2M, fused)"
FM_FIRST = "diffusers FlowMatchEulerDiscrete.step, first step (timestep lookup)"
FM_STEP = "diffusers FlowMatchEulerDiscrete.step"
FUSED_FLOW = "fastdiff multistep (flow Euler, fused)"
OURS_UNET, OURS_UNET_CL, DIFFUSERS_UNET = "fastdiff UNet2D", "fastdiff UNet2D channels_last", "diffusers UNet2DModel"


def _diffusers():
    """diffusers, or None (a GPU machine without the carried wheels: its rows are left out, and the output says so)."""
    try:
        import diffusers
        from diffusers.utils import logging as dlog
    except ImportError:
        return None
    dlog.set_verbosity_error()  # its note on casting a model with .to(fp16) is about loading weights: none here
    return diffusers


def sampler_rows(shape, dtype) -> list[dict]:
    import fastdiff  # noqa: F401  (registers the fastdiff ops)

    meta = dict(device="meta", dtype=dtype)
    x, o = torch.empty(shape, **meta), torch.empty(shape, **meta)
    # fastdiff: the loop keeps the (steps, NUM_COEF) float64 table on the device and passes row i; a DDIM η=0 row
    # reads x and o and writes the next sample (no history)
    rows = [_fastdiff_multistep_row(x, o, shape, dtype, what=FUSED_DDIM, hist=False)]
    d = _diffusers()
    if d is None:
        return rows + [_fastdiff_multistep_row(x, o, shape, dtype)]
    ddim = d.DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    ddim.set_timesteps(STEPS)  # DDIMPipeline: timesteps on the CPU
    with counting() as c:
        ddim.step(o, ddim.timesteps[STEP_I], x, eta=0.0)
    rows.append(summarize(c, DIFFUSERS_DDIM, shape, dtype))

    # DPM-Solver++(2M). Pipelines call set_timesteps(device=<the GPU>): the timesteps are device-resident
    dpm = d.DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2)
    dpm.set_timesteps(STEPS)
    ts = dpm.timesteps
    with counting(resident=(ts,)) as c:
        t0 = ts[0]
        dpm.step(o, t0, x)
    rows.append(summarize(c, DPM_FIRST, shape, dtype))
    dpm.step(o, ts[1], x)  # second warm-up step: from here on the 2M branch runs
    with counting(resident=(ts,)) as c:
        dpm.step(o, ts[2], x)
    rows.append(summarize(c, DPM_2M, shape, dtype))
    rows.append(_fastdiff_multistep_row(x, o, shape, dtype))

    # flow matching (SD3, Flux): FlowMatchEulerDiscreteScheduler, timesteps device-resident as pipelines set them
    fm = d.FlowMatchEulerDiscreteScheduler(shift=3.0)
    fm.set_timesteps(STEPS)
    ts = fm.timesteps
    with counting(resident=(ts,)) as c:
        fm.step(o, ts[0], x)
    rows.append(summarize(c, FM_FIRST, shape, dtype))
    with counting(resident=(ts,)) as c:
        fm.step(o, ts[1], x)
    rows.append(summarize(c, FM_STEP, shape, dtype))
    rows.append(_fastdiff_multistep_row(x, o, shape, dtype, what=FUSED_FLOW, hist=False))
    return rows


def _fastdiff_multistep_row(x, o, shape, dtype, what=FUSED_2M, hist=True) -> dict:
    """One fused multistep call: DPM-Solver++ 2M (reads x, o and one stored x̂0; writes the sample and x̂0), or with
    hist=False a step that keeps nothing (flow Euler: reads x, o; writes the sample)."""
    try:
        from fastdiff.ops import multistep as ms
    except ImportError as e:
        why = f"contract (fastdiff.ops.multistep not importable: {e})"
    else:
        try:
            h, out, d = (torch.empty_like(x) for _ in range(3))
            table = torch.empty((STEPS, ms.NUM_COEF), dtype=torch.float64, device=x.device)
            # check=False: the per-step call of a sampling loop, which checked its arguments once (the overlap
            # check of check=True cannot tell meta tensors apart: they all have data pointer 0)
            with counting() as c:
                if hist:
                    ms.multistep_step(x, o, table[STEP_I], hist=(h,), out=out, d_out=d, check=False)
                else:
                    ms.multistep_step(x, o, table[STEP_I], out=out, check=False)
            if not all(k.op.startswith("fastdiff.") for k in c.kernels):
                raise RuntimeError(f"ran {[k.op for k in c.kernels]}, not a fused op (extension not built?)")
            return summarize(c, what, shape, dtype, note="counted from fastdiff.ops.multistep.multistep_step")
        except Exception as e:  # noqa: BLE001  (an op in progress: say why, fall back to its contract)
            why = f"contract (fastdiff.ops.multistep did not run on meta tensors: {type(e).__name__}: {e})"
    c = Counter()
    n = x.numel() * x.element_size()
    c.add("fastdiff.multistep_step_ (contract)", 1, (5 if hist else 3) * n + 24 * 8)  # x, o (h0) read; out (d) written
    return summarize(c, what, shape, dtype, note=why)


# ---- (b) one U-Net forward ---------------------------------------------------------------------------------------

def unet_rows(batches, dtype) -> list[dict]:
    from fastdiff.nn import UNet2D
    from fastdiff.nn.unet import UNet2DConfig

    cfg = UNet2DConfig.ddpm_cifar10()
    d = _diffusers()
    fmt = dict(memory_format=torch.channels_last)
    with torch.device("meta"):  # channels_last: model and input, as benchmarks/bench_unet.py's fastdiff_cl form
        models = {OURS_UNET: UNet2D(cfg).to(dtype), OURS_UNET_CL: UNet2D(cfg).to(dtype).to(**fmt)}
        if d is not None:
            models[DIFFUSERS_UNET] = d.UNet2DModel(**cfg.to_dict()).to(dtype)
    nparams = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    if len(set(nparams.values())) != 1:
        raise RuntimeError(f"the U-Nets differ: {nparams}")
    rows = []
    for B in batches:
        shape = (B, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        for name, m in models.items():
            m.eval()
            x = torch.empty(shape, device="meta", dtype=dtype)
            if name == OURS_UNET_CL:
                x = x.to(**fmt)
            t = torch.tensor(500)  # a pipeline passes a CPU 0-d timestep
            with counting() as c:
                m(x, t)
            rows.append(summarize(c, name, shape, dtype, note=f"{nparams[name]:,} parameters"))
    return rows


# ---- output ------------------------------------------------------------------------------------------------------

def _commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "benchmarks/gpu_model.py"], cwd=here + "/..",
                               timeout=10).returncode
        return (sha or "unknown") + (" (+local changes to gpu_model.py)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _times(row) -> list[str]:
    """'eager / graph' µs per device; a call with a device→host sync cannot be captured in a CUDA graph."""
    g = (lambda d: "—") if row["syncs"] else (lambda d: f"{row[d]['graph_us']:.1f}")
    return [f"{row[d]['eager_us']:.1f} / {g(d)}" for d in DEVICES]


def markdown(res: dict) -> str:
    devs = " | ".join(f"{d} eager / graph µs" for d in DEVICES)
    L = ["**Predicted (not measured)** — GPU cost on paper from kernel, byte and FLOP counts made on the CPU "
         "(`python benchmarks/gpu_model.py --markdown`; model and inputs in the script's docstring).", "",
         f"- date {res['date']}, commit {res['commit']}, torch {res['torch']}, diffusers {res['diffusers']}",
         f"- inputs (published, not measured here): launch {LAUNCH_EAGER_S * 1e6:g} µs eager, "
         f"{LAUNCH_GRAPH_S * 1e6:g} µs per CUDA-graph node; "
         + "; ".join(f"{d}: {v['note']}" for d, v in DEVICES.items())
         + f"; fp16 dense tensor-core peak {FP16_PEAK / 1e12:g} TFLOP/s (both GPUs)",
         "- model: per kernel launches·L + max(bytes/BW, flops/peak), summed; host ops and syncs are counted, "
         "not timed", "",
         "One sampling step (the model call excluded):", "",
         f"| step | shape | kernels | MB moved | host ops | syncs | {devs} |",
         "|---|---|---|---|---|---|" + "---|" * len(DEVICES)]
    for r in res["sampler"]:
        syncs = ", ".join(r["syncs"]) or "0"
        what = r["what"] + (" †" if r["note"].startswith("contract") else "")
        L.append(f"| {what} | {'×'.join(map(str, r['shape']))} {r['dtype']} | {r['kernels']} | "
                 f"{r['bytes'] / 1e6:.3f} | {r['host_ops']} | {syncs} | " + " | ".join(_times(r)) + " |")
    notes = OrderedDict(((r["what"], r["note"]), None) for r in res["sampler"] if r["note"])
    L += [""] + [("† " if n.startswith("contract") else "- ") + f"{w}: {n}" for w, n in notes]
    L += ["- graph time —: a step with a device→host sync cannot be captured in a CUDA graph. The graph column of a "
          "diffusers step is the cost of its kernels as graph nodes; a replay would reuse the CPU-side coefficients "
          "baked in at capture, so diffusers' steps do not run correctly as captured graphs without changes."]
    L += ["", "One U-Net forward (google/ddpm-cifar10-32 architecture, random weights):", "",
          f"| model | input | kernels | GB moved | GFLOP | {devs} | diffusers / fastdiff (H100, eager / graph) |",
          "|---|---|---|---|---|" + "---|" * len(DEVICES) + "---|"]
    by = {(r["what"], tuple(r["shape"])): r for r in res["unet"]}
    for r in res["unet"]:
        ratio = ""
        if r["what"] in (OURS_UNET, OURS_UNET_CL):
            ref = by.get((DIFFUSERS_UNET, tuple(r["shape"])))
            if ref:
                d = next(iter(DEVICES))
                ratio = (f"{ref[d]['eager_us'] / r[d]['eager_us']:.2f}× / "
                         f"{ref[d]['graph_us'] / r[d]['graph_us']:.2f}×")
        L.append(f"| {r['what']} | {'×'.join(map(str, r['shape']))} {r['dtype']} | {r['kernels']} | "
                 f"{r['bytes'] / 1e9:.3f} | {r['flops'] / 1e9:.1f} | " + " | ".join(_times(r)) + f" | {ratio} |")
    loops = loop_rows(res)
    if loops:
        L += ["", f"A {STEPS}-step DDIM loop (η=0), derived: {STEPS} × (U-Net forward + step) from the two tables "
              "above, no overlap between kernels; diffusers eager (its pipeline), fastdiff eager and with the whole "
              "loop captured as one CUDA graph (`cuda_graph=True`):", "",
              "| batch | " + " | ".join(f"{d}: diffusers / fastdiff eager / fastdiff graph ms" for d in DEVICES)
              + " | diffusers / fastdiff graph (H100) |", "|---|" + "---|" * (len(DEVICES) + 1)]
        for lp in loops:
            d0 = next(iter(DEVICES))
            cells = [" / ".join(f"{lp[d][k]:.1f}" for k in ("diffusers_eager_ms", "fastdiff_eager_ms",
                                                             "fastdiff_graph_ms")) for d in DEVICES]
            L.append(f"| {lp['batch']} | " + " | ".join(cells)
                     + f" | {lp[d0]['diffusers_eager_ms'] / lp[d0]['fastdiff_graph_ms']:.2f}× |")
    return "\n".join(L)


def loop_rows(res: dict) -> list[dict]:
    """The STEPS-step DDIM loop at each batch where both tables have the (B, 3, 32, 32) case."""
    step = {(r["what"], tuple(r["shape"]), r["dtype"]): r for r in res["sampler"]}
    unet = {(r["what"], tuple(r["shape"]), r["dtype"]): r for r in res["unet"]}
    out = []
    for (what, shape, dt), ours in unet.items():
        if what != OURS_UNET:
            continue
        parts = [unet.get((DIFFUSERS_UNET, shape, dt)), step.get((DIFFUSERS_DDIM, shape, dt)),
                 step.get((FUSED_DDIM, shape, dt))]
        if None in parts:
            continue
        ref, ref_step, fused = parts
        row = OrderedDict(batch=shape[0], dtype=dt, steps=STEPS)
        for d in DEVICES:
            row[d] = dict(diffusers_eager_ms=STEPS * (ref[d]["eager_us"] + ref_step[d]["eager_us"]) / 1e3,
                          fastdiff_eager_ms=STEPS * (ours[d]["eager_us"] + fused[d]["eager_us"]) / 1e3,
                          fastdiff_graph_ms=STEPS * (ours[d]["graph_us"] + fused[d]["graph_us"]) / 1e3)
        out.append(row)
    return out


def by_op(row: dict) -> list[tuple[str, int, int, int, int]]:
    """(op, calls, launches, bytes, flops) per op name, most bytes first."""
    agg: dict[str, list[int]] = {}
    for k in row["kernel_list"]:
        a = agg.setdefault(k["op"], [0, 0, 0, 0])
        a[0] += 1
        a[1] += k["launches"]
        a[2] += k["bytes"]
        a[3] += k["flops"]
    return sorted(((op, *a) for op, a in agg.items()), key=lambda r: -r[3])


def op_lists(res: dict) -> str:
    L = []
    for r in res["sampler"]:
        L.append(f"\n{r['what']} {r['shape']} {r['dtype']}: {r['kernels']} launches, host ops {r['host_ops']}, "
                 f"syncs {r['syncs']}")
        L += [f"  {k['op']:<36} launches {k['launches']}  bytes {k['bytes']:>12,}  flops {k['flops']:,}"
              for k in r["kernel_list"]]
    for r in res["unet"]:
        L.append(f"\n{r['what']} {r['shape']} {r['dtype']}: {r['kernels']} launches, per op:")
        L += [f"  {op:<32} calls {n:4d}  launches {nl:4d}  MB {b / 1e6:10.1f}  GFLOP {f / 1e9:8.1f}"
              for op, n, nl, b, f in by_op(r)]
    return "\n".join(L)


# ---- predicted beside measured (scripts/gpu_check.sh) ----------------------------------------------------------
def _bench_case(name: str, p: dict):
    """(row, "sampler" | "unet", shape or batch, dtype) that this model predicts for one benchmark of
    benchmarks/bench_sampler_step.py, bench_multistep.py or bench_unet.py (by its params), else None."""
    test, dt = name.split("[")[0], _dtype_of(str(p.get("dtype", "")))
    if test == "test_sampler_step" and p.get("impl") in ("fused", "diffusers") and dt:
        return {"fused": FUSED_DDIM, "diffusers": DIFFUSERS_DDIM}[p["impl"]], "sampler", tuple(p["shape"]), dt
    if test == "test_multistep" and p.get("impl") == "fused" and p.get("call") == "dpmpp2m":
        return FUSED_2M, "sampler", tuple(p["shape"]), torch.float32  # bench_multistep times float32 only
    forms = {"fastdiff": OURS_UNET, "fastdiff_cl": OURS_UNET_CL, "diffusers": DIFFUSERS_UNET}
    if test == "test_unet_forward" and p.get("form") in forms and dt:
        return forms[p["form"]], "unet", int(p["batch"]), dt
    return None


def _dtype_of(s: str):
    for name in ("bfloat16", "float16", "float32"):
        if name in s:
            return getattr(torch, name)
    return None


def _device_column() -> str:
    """The DEVICES entry of the GPU this runs on (H200: the measured-copy figure), else the first."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return "H200 copy" if "H200" in name else next(iter(DEVICES))


def compare(path: str) -> tuple[str, list[dict]]:
    """A markdown table: each benchmark of `path` (pytest-benchmark JSON) that this model predicts, its measured
    median beside the predicted eager time. Returns (table, rows)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        return f"No measured benchmarks to put beside the prediction ({path}: {e}).", []
    col = _device_column()
    cache: dict[tuple, dict] = {}
    out = []
    for b in data.get("benchmarks", []):
        case = _bench_case(b.get("name", ""), b.get("params") or {})
        if case is None:
            continue
        what, kind, size, dtype = case
        key = (kind, size, dtype)
        if key not in cache:
            rows = sampler_rows(size, dtype) if kind == "sampler" else unet_rows([size], dtype)
            cache[key] = {r["what"]: r for r in rows}
        pred = cache[key].get(what)
        if pred is not None:
            med_us = b["stats"]["median"] * 1e6
            out.append(dict(benchmark=b["name"], measured_on=str(b.get("extra_info", {}).get("device", "?")),
                            measured_median_us=med_us, predicted=what, device_column=col,
                            predicted_eager_us=pred[col]["eager_us"], kernels=pred["kernels"],
                            measured_over_predicted=med_us / pred[col]["eager_us"]))
    L = [f"Predicted (not measured; `{col}` column of benchmarks/gpu_model.py, eager) beside measured:", "",
         "| benchmark | measured on | kernels | predicted eager µs | measured median µs | measured / predicted |",
         "|---|---|---|---|---|---|"]
    L += [f"| {r['benchmark']} | {r['measured_on']} | {r['kernels']} | {r['predicted_eager_us']:.1f} | "
          f"{r['measured_median_us']:.1f} | {r['measured_over_predicted']:.2f} |" for r in out]
    if not out:
        L.append("| (no benchmark in the JSON that this model predicts) | | | | | |")
    return "\n".join(L), out


def run(shapes, batches, dtype) -> dict:
    d = _diffusers()
    t0 = time.perf_counter()
    res = OrderedDict(
        kind="prediction (not measured)", date=datetime.date.today().isoformat(), commit=_commit(),
        command="python benchmarks/gpu_model.py " + " ".join(sys.argv[1:]), torch=torch.__version__,
        diffusers=d.__version__ if d else "not installed (its rows are left out)",
        inputs=dict(launch_eager_us=LAUNCH_EAGER_S * 1e6, launch_graph_us=LAUNCH_GRAPH_S * 1e6,
                    devices=DEVICES, sms=SMS, source="published figures; these are predictions, not measurements"),
        sampler=[r for s in shapes for r in sampler_rows(s, dtype)], unet=unet_rows(batches, dtype))
    res["ddim_loop"] = loop_rows(res)
    res["count_seconds"] = round(time.perf_counter() - t0, 2)
    return res


def _shape(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes: expected e.g. 64x3x32x32, got {s!r}") from None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--markdown", action="store_true", help="print the markdown tables")
    p.add_argument("--json", metavar="OUT", help="write every number (and each kernel) to OUT")
    p.add_argument("--ops", action="store_true", help="print every kernel of each sampler step, U-Net ops by kind")
    p.add_argument("--measured", metavar="BENCH_JSON",
                   help="pytest-benchmark JSON (scripts/gpu_check.sh): print its medians beside the prediction")
    p.add_argument("--shapes", type=_shape, nargs="+",
                   default=[(1, 3, 32, 32), (64, 3, 32, 32), (256, 3, 32, 32), (16, 4, 128, 128)],
                   help="sampler-step shapes (default: CIFAR-10 batches 1/64/256 and a 16x4x128x128 latent)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256], help="U-Net batch sizes")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    a = p.parse_args(argv)
    if any(b < 1 for b in a.batches):
        p.error(f"--batches must be positive, got {a.batches}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # nothing here computes: meta tensors
    try:
        res = run(a.shapes, a.batches, getattr(torch, a.dtype))
    finally:
        torch.set_num_threads(threads)
    table = None
    if a.measured:
        table, res["measured"] = compare(a.measured)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    if a.markdown or not (a.json or a.measured):
        print(markdown(res))
    if table:
        print(("\n" if a.markdown else "") + table)
    if a.ops:
        print(op_lists(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
