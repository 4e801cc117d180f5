"""The identity of a model's weights, for graph caches.

A captured CUDA graph (or a compiled module with frozen weights) reads the parameters and buffers at the addresses it
saw when it was made. Keying a cache on `id(model)` alone replays stale weights after `load_state_dict` into new
tensors, a LoRA switch that replaces weights, `model.to(...)`, or a new model allocated at a freed object's address.
`model_key` names every parameter's and buffer's storage (address, offset, shape, stride, dtype, device), so any of
those changes gives a new key. Weights changed *in place* (same storage) keep their key: a CUDA graph reads them at
replay, so it sees the new values anyway.
"""
from __future__ import annotations

import torch


def model_key(model) -> tuple:
    """A hashable key of `model`'s weights: for every named parameter and buffer (a torch.nn.Module's, or those of
    the modules in a list/tuple, or () for a plain callable) its name, storage address, storage offset, shape,
    stride, dtype and device. Cheap (no device sync: addresses and metadata only)."""
    if isinstance(model, torch.nn.Module):
        mods = [model]
    elif isinstance(model, (list, tuple)):
        mods = [m for m in model if isinstance(m, torch.nn.Module)]
    else:
        return ()
    out = []
    for j, m in enumerate(mods):
        for kind, items in (("p", m.named_parameters(remove_duplicate=False)),
                            ("b", m.named_buffers(remove_duplicate=False))):
            for name, t in items:
                if t is None:
                    continue
                out.append((j, kind, name, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                            t.stride(), t.dtype, str(t.device)))
    return tuple(out)


__all__ = ["model_key"]
