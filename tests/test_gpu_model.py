"""benchmarks/gpu_model.py: the counts on cases whose answer is known by hand, the cost formula, and the script on tiny
settings (it must stay quick: CI runs it, and scripts/gpu_check.sh does on the GPU machine)."""
import importlib.util
import json
import os
import sys
import time

import pytest
import torch

import fastdiff  # noqa: F401  (registers the fastdiff ops)
from fastdiff.ops import multistep as ms
from tests.conftest import requires_cpp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_model.py")
_spec = importlib.util.spec_from_file_location("gpu_model", SCRIPT)
gm = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("gpu_model", gm)  # dataclasses look their module up
_spec.loader.exec_module(gm)

META16 = dict(device="meta", dtype=torch.float16)


def test_add_is_one_kernel_of_three_tensors():
    a, b = torch.empty(1000, 7, **META16), torch.empty(1000, 7, **META16)
    with gm.counting() as c:
        a + b
        torch.cat([a, b[:500]])  # a tensor list: each input read once, the output written once
    assert [(k.op, k.launches, k.bytes, k.flops) for k in c.kernels] == [
        ("add", 1, 3 * 7000 * 2, 0), ("cat", 1, 2 * (7000 + 3500) * 2, 0)]
    assert c.host_ops == [] and c.syncs == []


def test_views_and_allocations_are_free_inplace_and_out_are_not_double_counted():
    a, b = torch.empty(64, 32, **META16), torch.empty(64, 32, **META16)
    n = 64 * 32 * 2
    with gm.counting() as c:
        a.t().transpose(0, 1).reshape(-1).view(32, 64)
        torch.empty_like(a)
        a.add_(b)  # reads a and b, writes a
        torch.add(a, b, out=torch.empty_like(a))  # reads a and b, writes out (never reads it)
        a[:, None, :].expand(64, 5, 32).float()  # the broadcast dimension is read once; written 5 times in fp32
    assert [(k.op, k.bytes) for k in c.kernels] == [("add_", 3 * n), ("add", 3 * n), ("_to_copy", n + 5 * 2 * n)]


def test_cpu_scalar_is_a_kernel_argument_and_cpu_only_ops_are_host_ops():
    x = torch.empty(4096, **META16)
    s = torch.tensor(0.25)
    with gm.counting() as c:
        y = (1 - s) ** 0.5  # two host ops: a CPU 0-d tensor is no launch
        x * y
    assert c.host_ops == ["rsub", "pow"]
    assert [(k.op, k.bytes) for k in c.kernels] == [("mul", 2 * 4096 * 2)]


def test_syncs_on_device_resident_tensors():
    ts = torch.arange(10, 0, -1)  # stands for GPU-resident timesteps
    with gm.counting(resident=(ts,)) as c:
        idx = (ts == 7).nonzero()
        idx[0].item()
        ts.sum().item()
        torch.arange(3).sum().item()  # CPU only: host ops, no device sync
    assert c.syncs == ["nonzero", "_local_scalar_dense", "_local_scalar_dense"]
    assert [k.op for k in c.kernels] == ["eq", "nonzero", "sum"]
    assert c.host_ops == ["arange", "sum", "_local_scalar_dense"]


@requires_cpp  # on meta tensors the fused ops resolve to the C++ op's fake kernel
def test_fused_ddim_step_is_one_kernel_moving_exactly_its_arguments():
    """A DDIM η=0 row as the sampling loop runs it (the raw op after one checked call): one fused kernel reading x
    and o and the coefficient row, writing the next sample."""
    x, o = torch.empty(3, 5, 7, 11, **META16), torch.empty(3, 5, 7, 11, **META16)
    out = torch.empty_like(x)
    table = torch.empty(50, ms.NUM_COEF, dtype=torch.float64, device="meta")
    with gm.counting() as c:
        ms.multistep_step(x, o, table[10], out=out, check=False)
    n = x.numel() * 2
    assert [(k.op, k.launches, k.bytes) for k in c.kernels] == [("fastdiff.multistep_step_", 1, 3 * n + 8 * ms.NUM_COEF)]


def test_gemm_conv_and_attention_flops():
    a, b, bias = torch.empty(8, 16, **META16), torch.empty(16, 4, **META16), torch.empty(4, **META16)
    x, w = torch.empty(2, 3, 10, 10, **META16), torch.empty(6, 3, 3, 3, **META16)
    q, k = torch.empty(2, 1, 9, 8, **META16), torch.empty(2, 1, 5, 8, **META16)
    v = torch.empty(2, 1, 5, 4, **META16)
    with gm.counting() as c:
        a @ b
        torch.addmm(bias, a, b)
        torch.nn.functional.conv2d(x, w, padding=1)
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    flops = [(kk.op, kk.flops) for kk in c.kernels]
    assert flops == [("mm", 2 * 8 * 4 * 16), ("addmm", 2 * 8 * 4 * 16), ("convolution", 2 * (2 * 6 * 10 * 10) * 27),
                     ("scaled_dot_product_attention", 2 * 2 * 9 * 5 * (8 + 4))]
    assert c.kernels[-1].bytes == 2 * (2 * 9 * 8 + 2 * 5 * 8 + 2 * 5 * 4 + 2 * 9 * 4)


def test_convolution_as_cudnn_runs_it():
    """PyTorch's cuDNN path: the bias is a separate add_; channels_last if the input or the weight is, the other one
    copied to it; the output in that layout (the meta kernel alone would return NCHW)."""
    x, w, b = torch.empty(2, 8, 6, 6, **META16), torch.empty(4, 8, 3, 3, **META16), torch.empty(4, **META16)
    xb, wb, ob, bb = 2 * 8 * 36 * 2, 4 * 8 * 9 * 2, 2 * 4 * 36 * 2, 4 * 2
    with gm.counting() as c:
        y = torch.nn.functional.conv2d(x, w, b, padding=1)
    assert [(k.op, k.bytes) for k in c.kernels] == [("convolution", xb + wb + ob),
                                                     ("convolution: bias add_", 2 * ob + bb)]
    assert y.is_contiguous()
    xcl = x.to(memory_format=torch.channels_last)
    with gm.counting() as c:
        y = torch.nn.functional.conv2d(xcl, w, padding=1)
    assert [(k.op, k.bytes) for k in c.kernels] == [("convolution: weight to channels_last", 2 * wb),
                                                     ("convolution", xb + wb + ob)]
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert gm.suggests_channels_last(torch.empty(4, 8, 1, 1).to(memory_format=torch.channels_last))
    assert not gm.suggests_channels_last(torch.empty(4, 8, 1, 1))


def test_group_norm_launches():
    w = torch.empty(128, **META16)
    with gm.counting() as c:
        torch.nn.functional.group_norm(torch.empty(4, 128, 8, 8, **META16), 32, w, w)
    assert [(k.op, k.launches, k.bytes) for k in c.kernels][:1] == [
        ("native_group_norm", 3, 3 * 4 * 128 * 64 * 2 + 2 * 128 * 2 + 2 * 4 * 32 * 2)]  # mean, rstd in x's dtype
    # gns::plan: batch 1 × 32 groups of 4·1024 elements splits 8 ways (kMinSlice 512); batch 256 does not split
    assert gm.gns_plan_split(1, 128, 1024, 32, False) == 8
    assert gm.gns_plan_split(256, 128, 1024, 32, False) == 1
    assert gm.gns_plan_split(256, 256, 16, 32, True) == 4  # channels_last: one unit per sample


def test_cost_model():
    dev = dict(bw=2e12, peaks=dict(fp16=1e15, tf32=5e14, fp32=1e14))
    assert gm.Kernel("add", 1, 4e6).seconds(dev, 2e-6) == pytest.approx(2e-6 + 2e-6)  # memory-bound
    assert gm.Kernel("mm", 1, 4e6, 1e10).seconds(dev, 1e-6) == pytest.approx(1e-6 + 1e-5)  # compute-bound
    assert gm.Kernel("mm", 1, 4e6, 1e10, "fp32").seconds(dev, 1e-6) == pytest.approx(1e-6 + 1e-4)
    assert gm.Kernel("gn", 3, 0).seconds(dev, 2e-6) == pytest.approx(6e-6)
    # float32: convolutions at the TF32 rate (cuDNN's default in PyTorch), GEMMs at the FP32 rate
    a = torch.empty(8, 8, device="meta")
    with gm.counting() as c:
        a @ a
        torch.nn.functional.conv2d(torch.empty(1, 3, 4, 4, device="meta"), torch.empty(2, 3, 1, 1, device="meta"))
        torch.empty(8, 8, **META16) @ torch.empty(8, 8, **META16)
    assert [(k.op, k.math) for k in c.kernels] == [("mm", "fp32"), ("convolution", "tf32"), ("mm", "fp16")]


@requires_cpp
def test_script_tiny_settings(tmp_path, capsys):
    """The command line on tiny settings (in this process: the imports are the test suite's already)."""
    out = tmp_path / "gpu_model.json"
    threads = torch.get_num_threads()
    t0 = time.perf_counter()
    assert gm.main(["--markdown", "--json", str(out), "--shapes", "2x3x8x8", "--batches", "1"]) == 0
    took = time.perf_counter() - t0
    assert torch.get_num_threads() == threads  # main() restores what it changed
    res = json.loads(out.read_text())
    assert res["count_seconds"] < 20 and took < 60, f"counting {res['count_seconds']} s, main() {took:.1f} s"
    assert "Predicted (not measured)" in capsys.readouterr().out
    rows = {r["what"]: r for r in res["sampler"]}
    n = 2 * 3 * 8 * 8 * 2
    fused = rows[gm.FUSED_DDIM]
    assert (fused["kernels"], fused["bytes"]) == (1, 3 * n + 8 * ms.NUM_COEF)
    # diffusers' DDIM step, η = 0, by hand: ε-term mul, sub, div (x̂0), mul, mul, add (x_prev): 6 kernels, 14 passes
    ddim = rows["diffusers DDIMScheduler.step (η=0)"]
    assert (ddim["kernels"], ddim["bytes"], ddim["syncs"]) == (6, 14 * n, [])
    first = rows["diffusers DPMSolverMultistep.step, first step (1st order + timestep lookup)"]
    assert first["syncs"] == ["nonzero", "_local_scalar_dense"]
    dpm = rows["diffusers DPMSolverMultistep.step (2M)"]
    assert dpm["syncs"] == [] and dpm["kernels"] > 1
    # the op (when importable) moves what its contract says: x, o, one history read; out, d_out written; 24 coefs
    m2 = rows["fastdiff multistep (DPM-Solver++ 2M, fused)"]
    assert (m2["kernels"], m2["bytes"]) == (1, 5 * n + 24 * 8) and m2["note"]
    u = {r["what"]: r for r in res["unet"]}
    ours, ours_cl, ref = u[gm.OURS_UNET], u[gm.OURS_UNET_CL], u[gm.DIFFUSERS_UNET]
    assert ours["flops"] == ours_cl["flops"] == ref["flops"] > 1e10  # one architecture: ~12 GFLOP per 32×32 image
    assert ours["kernels"] < ref["kernels"] and ours_cl["kernels"] < ref["kernels"]
    assert ours_cl["bytes"] < ref["bytes"]  # (NCHW at batch 1: the conv weights copied to channels_last outweigh it)
    for r in res["sampler"] + res["unet"]:
        for d in gm.DEVICES:
            assert 0 < r[d]["graph_us"] < r[d]["eager_us"]


@requires_cpp
def test_measured_beside_predicted(tmp_path):
    """--measured: each benchmark this model predicts gets its prediction; the others are left out."""
    bench = {"benchmarks": [
        {"name": "test_sampler_step[2x3x8x8-fp16-fused]", "stats": {"median": 5e-5}, "extra_info": {"device": "X"},
         "params": {"shape": [2, 3, 8, 8], "dtype": "UNSERIALIZABLE[torch.float16]", "impl": "fused"}},
        {"name": "test_sampler_step[2x3x8x8-fp16-copy]", "stats": {"median": 1e-5},
         "params": {"shape": [2, 3, 8, 8], "dtype": "UNSERIALIZABLE[torch.float16]", "impl": "copy"}},
        {"name": "test_multistep[2x3x8x8-dpmpp2m-fused]", "stats": {"median": 3e-5},
         "params": {"shape": [2, 3, 8, 8], "call": "dpmpp2m", "impl": "fused"}},
        {"name": "test_multistep[2x3x8x8-unipc3-fused]", "stats": {"median": 3e-5},
         "params": {"shape": [2, 3, 8, 8], "call": "unipc3", "impl": "fused"}},
        {"name": "test_unet_forward[diffusers-1-torch.float16]", "stats": {"median": 2e-3},
         "params": {"form": "diffusers", "batch": 1, "dtype": "UNSERIALIZABLE[torch.float16]"}},
    ]}
    path = tmp_path / "benchmarks.json"
    path.write_text(json.dumps(bench))
    table, rows = gm.compare(str(path))
    assert [r["predicted"] for r in rows] == [gm.FUSED_DDIM, gm.FUSED_2M, gm.DIFFUSERS_UNET]
    col = rows[0]["device_column"]
    pred = gm.sampler_rows((2, 3, 8, 8), torch.float16)[0]
    assert rows[0]["predicted_eager_us"] == pytest.approx(pred[col]["eager_us"])
    assert rows[0]["measured_over_predicted"] == pytest.approx(50.0 / pred[col]["eager_us"])
    assert rows[0]["measured_on"] == "X" and "Predicted (not measured" in table
    assert "No measured benchmarks" in gm.compare(str(tmp_path / "missing.json"))[0]


def test_meta_counts_equal_real_tensor_counts_for_diffusers_steps():
    """The same counts from meta tensors (what the script uses) and from real CPU tensors marked device-resident:
    the meta kernels take the same code paths in diffusers' steps."""
    diffusers = pytest.importorskip("diffusers")

    def counts(meta: bool):
        g = torch.Generator().manual_seed(0)
        x, o = (torch.randn(2, 3, 8, 8, generator=g).half() for _ in range(2))
        if meta:
            x, o = x.to("meta"), o.to("meta")
        res = []
        ddim = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
        ddim.set_timesteps(50)
        dpm = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++")
        dpm.set_timesteps(50)
        dpm.step(o, dpm.timesteps[0], x)
        dpm.step(o, dpm.timesteps[1], x)
        for step in (lambda: ddim.step(o, ddim.timesteps[10], x, eta=0.0), lambda: dpm.step(o, dpm.timesteps[2], x)):
            with gm.counting(resident=() if meta else (x, o)) as c:
                step()
            res.append(([(k.op, k.launches, k.bytes) for k in c.kernels], c.host_ops, c.syncs))
        return res

    meta, real = counts(True), counts(False)
    assert meta == real and len(meta[0][0]) == 6


def test_meta_counts_equal_real_tensor_counts_for_a_unet():
    """fastdiff's U-Net (a small config, fp32) counted on meta tensors and on real CPU tensors marked
    device-resident: the same kernels from the first convolution on (before it, the time embedding of a CPU
    timestep is host work in the real run), so the meta kernels and the counter's cuDNN layout rule agree with
    what real tensors do on this path."""
    from fastdiff.nn import UNet2D
    from fastdiff.nn.unet import UNet2DConfig

    cfg = UNet2DConfig(sample_size=8, block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, layers_per_block=1)
    torch.manual_seed(0)
    model = UNet2D(cfg).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor(500)

    def count(m, xx, resident):
        with gm.counting(resident=resident) as c:
            m(xx, t)
        ks = [(k.op, k.launches, k.bytes, k.flops) for k in c.kernels]
        return ks[[k[0] for k in ks].index("convolution"):]

    real = count(model, x, (*model.parameters(), *model.buffers(), x))
    meta = count(UNet2D(cfg).to("meta").eval(), x.to("meta"), ())
    assert real == meta and len(real) > 100
    assert any(k[0] == "convolution: weight to channels_last" for k in real)  # the layout rule took effect
