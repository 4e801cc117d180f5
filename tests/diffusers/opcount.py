"""Count what a scheduler does per step, by the aten ops it dispatches (a TorchDispatchMode): host syncs (ops that
read a tensor's value back to the host: `_local_scalar_dense` under .item()/bool()/int()/float(), `nonzero`, whose
output size depends on values, `is_nonzero`, and copies between devices) and the ops ("kernels") it launches."""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "nonzero_static"}
# ops that only make views or metadata (no kernel)
VIEW_OPS = {"view", "_unsafe_view", "reshape", "expand", "select", "slice", "as_strided", "unsqueeze", "squeeze",
            "permute", "t", "transpose", "alias", "detach", "split", "split_with_sizes", "chunk", "unbind",
            "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "_to_copy_noop"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        out = func(*args, **kwargs)
        if name in SYNC_OPS:
            self.syncs.append(name)
        elif name in ("_to_copy", "copy_"):
            devs = {a.device for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)}
            dev = kwargs.get("device")
            if dev is not None:
                devs.add(torch.device(dev))
            if torch.is_tensor(out):
                devs.add(out.device)
            if len(devs) > 1:
                self.syncs.append(f"{name}({'->'.join(sorted(map(str, devs)))})")
        if name not in VIEW_OPS:
            self.ops.append(name)
        return out


class StepCounts:
    """Wraps a scheduler's step and scale_model_input: per-step lists of syncs and launched ops."""

    def __init__(self, scheduler):
        self.s = scheduler
        self.steps: list[OpCounter] = []
        self.prep: list[OpCounter] = []
        self._orig = {}
        for meth, sink in (("step", self.steps), ("scale_model_input", self.prep)):
            fn = getattr(scheduler, meth)
            self._orig[meth] = fn

            def wrapped(*a, _fn=fn, _sink=sink, **k):
                c = OpCounter()
                with c:
                    r = _fn(*a, **k)
                _sink.append(c)
                return r
            setattr(scheduler, meth, wrapped)

    def close(self):
        for meth in self._orig:
            delattr(self.s, meth)

    def syncs_per_step(self):
        """[syncs of step i (its scale_model_input included)]."""
        n = len(self.steps)
        pre = self.prep + [OpCounter()] * (n - len(self.prep))
        return [len(self.steps[i].syncs) + len(pre[i].syncs) for i in range(n)]

    def ops_per_step(self):
        return [len(c.ops) for c in self.steps]


@contextlib.contextmanager
def counting(scheduler):
    c = StepCounts(scheduler)
    try:
        yield c
    finally:
        c.close()
