"""`fastdiff.optimize(pipe)`: a diffusers pipeline (or a bare UNet2DModel / UNet2DConditionModel / AutoencoderKL, or
any module holding diffusers' ResnetBlock2D) on fastdiff's kernels, in place.

    import fastdiff.optimize
    pipe = fastdiff.optimize(pipe)                    # the module is callable; fastdiff.optimize.optimize is the same

What it changes (each a no-op when already done, so a second call changes nothing):

- every diffusers `ResnetBlock2D` whose norms are GroupNorm and whose activation is SiLU runs both
  GroupNorm+SiLU pairs as `fastdiff.ops.group_norm_silu`, the time-embedding add that sits before `norm2` fused into
  the second one (`add=`); scale-shift blocks fuse `norm1` and run `norm2` without the activation. Other inputs
  (float64, a temb that is not one vector per sample) take diffusers' own forward, unchanged.
- attention: `attention="auto"` installs fastdiff's attention processor on CUDA modules only, where
  `fastdiff.ops.attention` measures SDPA against its Triton kernel per shape and keeps the faster (on the CPU
  fastdiff's attention *is* SDPA, diffusers' default, so there is nothing to win); "fastdiff" installs it everywhere,
  "keep" leaves the processors alone. Calls the processor cannot serve (masks, spatial/group norms, q/k norms) go to
  diffusers' AttnProcessor2_0.
- the scheduler becomes fastdiff's class of the same name with the same live config (fastdiff.diffusers.equivalent:
  every value, those a pipeline rewrote after construction included, e.g. steps_offset, which `from_config` would
  reset), when fastdiff has one and its fused step runs the settings (else a warning names why and diffusers'
  stays).
- `cuda_graph=True`: the U-Net call is captured in a CUDA graph per input structure (shapes, dtypes, devices and the
  non-tensor arguments) and per identity of the U-Net's weights (`fastdiff._graphkey.model_key`: every
  parameter's and buffer's storage), so a new batch size or resolution recaptures and swapped weights (a LoRA
  switch, load_state_dict(assign=True), .to()) never replay stale ones. Ignored with a warning off CUDA.
- `compile=True` (CPU): the U-Net forward compiled by inductor with weight freezing, recompiled (after
  `torch._dynamo.reset()`: frozen weights are constants of the compiled code) when the weights' identity changes.

`optimize` returns what it was given; `report(obj)` says what was changed.
"""
from __future__ import annotations

import sys
import types
import warnings

import torch
from torch import nn

from fastdiff._graphkey import model_key
from fastdiff.run.graphs import CaptureError, GraphCache, capture
from fastdiff.ops.attention import attention as _fd_attention
from fastdiff.ops.group_norm_silu import group_norm_silu

_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---- ResnetBlock2D ---------------------------------------------------------------------------------------------

def _gn(x, norm: nn.GroupNorm, silu: bool, add=None):
    return group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, silu=silu, add=add)


def _resnet_forward(self, input_tensor, temb, *args, **kwargs):
    """diffusers' ResnetBlock2D.forward (0.42.1) with GroupNorm+SiLU (+ the temb add) fused."""
    if input_tensor.dtype not in _FUSED_DTYPES or args or kwargs.get("scale") is not None:
        return self._fastdiff_eager_forward(input_tensor, temb, *args, **kwargs)
    h = _gn(input_tensor, self.norm1, True)
    if self.upsample is not None:
        if h.shape[0] >= 64:
            input_tensor, h = input_tensor.contiguous(), h.contiguous()
        input_tensor, h = self.upsample(input_tensor), self.upsample(h)
    elif self.downsample is not None:
        input_tensor, h = self.downsample(input_tensor), self.downsample(h)
    h = self.conv1(h)
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)  # (N, C): the [:, :, None, None] add is fused below
    if self.time_embedding_norm == "default":
        add = None
        if temb is not None:
            if temb.dim() == 2 and temb.shape[1] == h.shape[1] and temb.shape[0] in (1, h.shape[0]):
                add = temb.to(h.dtype).expand(h.shape[0], -1).contiguous()
            else:  # not one vector per sample: the plain add
                h = h + (temb[:, :, None, None] if temb.dim() == 2 else temb)
        h = _gn(h, self.norm2, True, add)
    elif self.time_embedding_norm == "scale_shift":
        if temb is None:
            raise ValueError(f" `temb` should not be None when `time_embedding_norm` is {self.time_embedding_norm}")
        time_scale, time_shift = torch.chunk(temb[:, :, None, None] if temb.dim() == 2 else temb, 2, dim=1)
        h = _gn(h, self.norm2, False)
        h = self.nonlinearity(h * (1 + time_scale) + time_shift)
    else:
        h = _gn(h, self.norm2, True)
    h = self.dropout(h)
    h = self.conv2(h)
    if self.conv_shortcut is not None:
        if self.training:
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)
    return (input_tensor + h) / self.output_scale_factor


def _fusable(block) -> str | None:
    """None when the block can be fused, else the reason."""
    if not (isinstance(block.norm1, nn.GroupNorm) and isinstance(block.norm2, nn.GroupNorm)):
        return "norms are not GroupNorm"
    if not isinstance(block.nonlinearity, nn.SiLU):
        return f"activation is {type(block.nonlinearity).__name__}, not SiLU"
    return None  # time_embedding_norm: "default" (temb added before norm2), "scale_shift", or anything else (plain)


def fuse_resnets(module: nn.Module) -> tuple[int, int, list]:
    """Patch every diffusers ResnetBlock2D in `module` (see the module docstring) → (patched now, already patched,
    [(name, reason) of blocks left alone])."""
    from diffusers.models.resnet import ResnetBlock2D

    new = done = 0
    left = []
    for name, m in module.named_modules():
        if not isinstance(m, ResnetBlock2D):
            continue
        if getattr(m, "_fastdiff_fused", False):
            done += 1
            continue
        why = _fusable(m)
        if why:
            left.append((name, why))
            continue
        m._fastdiff_eager_forward = m.forward
        m.forward = types.MethodType(_resnet_forward, m)
        m._fastdiff_fused = True
        new += 1
    return new, done, left


# ---- attention -------------------------------------------------------------------------------------------------

class FastdiffAttnProcessor:
    """diffusers' AttnProcessor2_0 with the attention itself as fastdiff.ops.attention (measured choice of SDPA or
    Triton on CUDA); calls with masks, spatial/group norms or q/k norms go to AttnProcessor2_0."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self._fallback = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if (attention_mask is not None or attn.spatial_norm is not None or attn.group_norm is not None
                or attn.norm_q is not None or attn.norm_k is not None or args or kwargs
                or hidden_states.dtype not in _FUSED_DTYPES):
            return self._fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        nd = hidden_states.ndim
        if nd == 4:
            b, c, hh, ww = hidden_states.shape
            hidden_states = hidden_states.view(b, c, hh * ww).transpose(1, 2)
        b = hidden_states.shape[0]
        q = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        d = k.shape[-1] // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, d).transpose(1, 2) for t in (q, k, v))
        out = _fd_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * d).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if nd == 4:
            out = out.transpose(-1, -2).reshape(b, c, hh, ww)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def set_attention(module: nn.Module, mode: str = "auto") -> int:
    """Install FastdiffAttnProcessor on the diffusers Attention modules of `module` (mode "auto": CUDA ones only;
    "fastdiff": all; "keep": none) → the number installed now."""
    if mode not in ("auto", "fastdiff", "keep"):
        raise ValueError(f"attention must be 'auto', 'fastdiff' or 'keep', got {mode!r}")
    if mode == "keep":
        return 0
    from diffusers.models.attention_processor import Attention

    n = 0
    for m in module.modules():
        if not isinstance(m, Attention) or isinstance(m.processor, FastdiffAttnProcessor):
            continue
        p = next(iter(m.parameters()), None)
        if mode == "auto" and (p is None or p.device.type != "cuda"):
            continue
        if type(m.processor).__name__ not in ("AttnProcessor2_0", "AttnProcessor"):
            continue  # a custom processor (IP-Adapter, LoRA, ...) is the user's: left alone
        m.set_processor(FastdiffAttnProcessor())
        n += 1
    return n


# ---- graph caches keyed on the weights' identity ---------------------------------------------------------------

def _leaves(args, kwargs):
    from torch.utils._pytree import tree_flatten

    leaves, spec = tree_flatten((args, kwargs))
    tensors = [x for x in leaves if torch.is_tensor(x)]
    others = tuple(("T", tuple(x.shape), x.dtype, str(x.device), x.stride()) if torch.is_tensor(x) else
                   ("V", x if isinstance(x, (int, float, bool, str, type(None))) else repr(x)) for x in leaves)
    return leaves, spec, tensors, others


class _Captured:
    """One captured call: static input tensors, the graph, static outputs (flattened)."""

    def __init__(self, fn, args, kwargs, capture):
        from torch.utils._pytree import tree_flatten, tree_unflatten

        leaves, spec = tree_flatten((args, kwargs))
        self.static = [x.clone() if torch.is_tensor(x) else x for x in leaves]
        sa, sk = tree_unflatten(self.static, spec)
        try:
            self.replay, out = capture(lambda: fn(*sa, **sk))
        except Exception as e:  # noqa: BLE001 - reported by the caller, then this structure runs eagerly
            raise CaptureError(f"{type(e).__name__}: {e}") from e
        self.out_leaves, self.out_spec = tree_flatten(out)

    def __call__(self, tensors):
        from torch.utils._pytree import tree_unflatten

        it = iter(tensors)
        for s in self.static:
            if torch.is_tensor(s):
                s.copy_(next(it))
        self.replay()
        return tree_unflatten([x.clone() if torch.is_tensor(x) else x for x in self.out_leaves], self.out_spec)


cuda_capture = capture  # fastdiff.run.graphs.capture: the one capture routine (the sampling loop's too)


class GraphedForward:
    """A module's forward replayed from captured graphs: one per (input structure, weights' identity), in a
    fastdiff.run.graphs.GraphCache of `max_graphs`. `capture(fn) -> (replay, static_output)` is fastdiff.run.graphs.capture
    on CUDA (a test passes a stand-in). Inputs are copied into the captured call's static tensors; outputs are
    cloned. A structure that cannot be captured runs eagerly (said once)."""

    def __init__(self, module: nn.Module, forward, capture=capture, max_graphs: int = 8):
        self.module, self.forward, self.capture = module, forward, capture
        self.graphs = GraphCache(max_graphs)
        self.captures = 0

    def key(self, args, kwargs):
        _, spec, _, others = _leaves(args, kwargs)
        return (repr(spec), others, model_key(self.module))

    def _to_device(self, args, kwargs):
        """CPU tensors (e.g. a pipeline's CPU timestep) moved to the module's device before the call: a graph cannot
        capture a copy from pageable host memory."""
        from torch.utils._pytree import tree_map

        p = next(iter(self.module.parameters()), None)
        if p is None or p.device.type == "cpu":
            return args, kwargs
        return tree_map(lambda x: x.to(p.device) if torch.is_tensor(x) and x.device.type == "cpu" else x,
                        (args, kwargs))

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.module.parameters()):
            return self.forward(*args, **kwargs)  # training: eager (a graph holds no autograd state)
        args, kwargs = self._to_device(args, kwargs)
        _, _, tensors, _ = _leaves(args, kwargs)
        k = self.key(args, kwargs)
        try:
            g, new = self.graphs.get(k, lambda: _Captured(self.forward, args, kwargs, self.capture))
        except CaptureError as e:
            if e.fresh:
                warnings.warn(f"fastdiff.optimize: cuda_graph: the U-Net call cannot be captured ({e}); running it "
                              "eagerly for this input structure", stacklevel=2)
            return self.forward(*args, **kwargs)
        self.captures += new
        return g(tensors)


class FrozenCompiled:
    """The forward compiled by inductor with weight freezing (CPU inference): recompiled when the weights' identity
    (model_key) changes, after torch._dynamo.reset() (frozen weights are constants of the compiled code)."""

    def __init__(self, module: nn.Module, forward):
        self.module, self.forward = module, forward
        self.key = None
        self.fn = None
        self.compiles = 0

    def __call__(self, *args, **kwargs):
        if torch.is_grad_enabled():
            return self.forward(*args, **kwargs)  # freezing is for inference
        k = model_key(self.module)
        if k != self.key:
            if self.key is not None:
                torch._dynamo.reset()
            self.fn = torch.compile(self.forward, backend="inductor", options={"freezing": True})
            self.key, self.compiles = k, self.compiles + 1
            import warnings  # the first call below compiles (a minute or more on a CPU): say so before it starts

            warnings.warn("fastdiff.optimize(compile=True): compiling the U-Net with inductor on this call (once per "
                          "weights; a minute or more on a CPU); later calls run the compiled code", stacklevel=2)
        return self.fn(*args, **kwargs)


# ---- the entry point -------------------------------------------------------------------------------------------

def _modules(obj) -> dict:
    if isinstance(obj, nn.Module):
        return {"model": obj}
    comps = getattr(obj, "components", None)
    if not isinstance(comps, dict):
        raise TypeError(f"optimize: expected a diffusers pipeline or a torch.nn.Module, got {type(obj).__name__}")
    return {k: v for k, v in comps.items() if isinstance(v, nn.Module)}


def _unet(obj):
    if isinstance(obj, nn.Module):
        return obj
    return getattr(obj, "unet", None)


def _takes_image(pipe) -> bool:
    import inspect

    try:
        params = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return False
    return "strength" in params or "image" in params


def optimize(obj, *, fuse: bool = True, attention: str = "auto", scheduler: bool = True, cuda_graph: bool = False,
             compile: bool = False, max_graphs: int = 8, _capture=None):
    """Put `obj` (a diffusers pipeline, or a UNet2DModel / UNet2DConditionModel / AutoencoderKL / any module with
    ResnetBlock2D's) on fastdiff's kernels in place and return it; see the module docstring. Idempotent."""
    if cuda_graph and compile:
        raise ValueError("optimize: cuda_graph=True and compile=True are exclusive (one is for CUDA, one for CPU)")
    rep = getattr(obj, "_fastdiff_report", None) or {"resnets": 0, "resnets_left": [], "attention": 0,
                                                     "scheduler": None, "unet_wrapper": None}
    mods = _modules(obj)
    for name, m in mods.items():
        if fuse:
            new, done, left = fuse_resnets(m)
            rep["resnets"] += new
            rep["resnets_left"] += [(f"{name}.{n}", why) for n, why in left if (f"{name}.{n}", why)
                                    not in rep["resnets_left"]]
        rep["attention"] += set_attention(m, attention)
    if scheduler and not isinstance(obj, nn.Module) and getattr(obj, "scheduler", None) is not None:
        from fastdiff import diffusers as fd

        old = obj.scheduler
        cfg = getattr(old, "config", {})
        if type(old) not in fd.SCHEDULERS.values():
            if type(old).__name__ == "PNDMScheduler" and not cfg.get("skip_prk_steps", False) and _takes_image(obj):
                warnings.warn("fastdiff.optimize: keeping diffusers' PNDMScheduler: PRK warm-up started "
                              "mid-schedule (img2img) is not offered by fastdiff's", stacklevel=2)
            else:
                new = fd.equivalent(old)
                if new is not None:
                    obj.scheduler = new
                    rep["scheduler"] = type(new).__name__
    unet = _unet(obj)
    if (cuda_graph or compile) and unet is not None and not isinstance(unet.forward, (GraphedForward, FrozenCompiled)):
        p = next(iter(unet.parameters()), None)
        dev = p.device.type if p is not None else "cpu"
        if cuda_graph and dev != "cuda" and _capture is None:
            warnings.warn(f"fastdiff.optimize: cuda_graph=True ignored: the U-Net is on {dev}", stacklevel=2)
        elif cuda_graph:
            unet.forward = GraphedForward(unet, unet.forward, _capture or capture, max_graphs)
            rep["unet_wrapper"] = "cuda_graph"
        elif dev != "cpu":
            warnings.warn(f"fastdiff.optimize: compile=True is the CPU option (inductor with weight freezing); the "
                          f"U-Net is on {dev}: use cuda_graph=True", stacklevel=2)
        else:
            unet.forward = FrozenCompiled(unet, unet.forward)
            rep["unet_wrapper"] = "inductor_freezing"
    try:
        object.__setattr__(obj, "_fastdiff_report", rep)
    except (AttributeError, TypeError):
        pass
    return obj


def report(obj) -> dict:
    """What optimize() changed in `obj`: {"resnets": n fused, "resnets_left": [(name, reason)], "attention": n
    processors installed, "scheduler": fastdiff class name or None, "unet_wrapper": None | "cuda_graph" |
    "inductor_freezing"}."""
    return dict(getattr(obj, "_fastdiff_report", None) or {})


class _CallableModule(types.ModuleType):
    """`import fastdiff.optimize; fastdiff.optimize(pipe)` works: the module calls `optimize`."""

    def __call__(self, *args, **kwargs):
        return optimize(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["FastdiffAttnProcessor", "FrozenCompiled", "GraphedForward", "cuda_capture", "fuse_resnets", "optimize",
           "report", "set_attention"]
