"""CUDA graphs: the one capture routine and the one cache for everything fastdiff replays — a whole sampling loop
(fastdiff.run.sampling) and a pipeline's U-Net forward (fastdiff.optimize).

`capture(fn)` warms fn up on a side stream (lazy initialisation of cuBLAS, cuDNN and Triton kernels stays out of
the graph), records one call and returns (replay, static output): a replay re-runs the recorded kernels on the same
buffers, so the caller copies new inputs into the static tensors it captured with and reads the static output.
`GraphCache` keeps captured entries by key, least recently used dropped past its size, and remembers a key whose
capture failed (its error) so that it is not captured again.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch


class CaptureError(RuntimeError):
    """A call could not be captured; the message names the reason. `fresh`: raised by this capture attempt (False:
    an earlier failure of the same key, remembered)."""

    fresh = True


def capture(fn: Callable):
    """Capture fn() in a CUDA graph after one warm-up call on a side stream → (replay, static output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


class _Failed:
    def __init__(self, message: str):
        self.message = message


class GraphCache:
    """Captured entries by key (least recently used dropped past `size`). `get(key, make)` returns (entry, new):
    the cached entry, or make()'s (which captures) — a CaptureError from make() is remembered for the key and
    raised again, with fresh=False, on the next get."""

    def __init__(self, size: int):
        self.size = int(size)
        self._items: OrderedDict = OrderedDict()

    def get(self, key, make: Callable):
        entry = self._items.get(key)
        if entry is None:
            try:
                entry = make()
            except CaptureError as e:
                entry = _Failed(str(e))
                self._store(key, entry)
                raise
            self._store(key, entry)
            return entry, True
        self._items.move_to_end(key)
        if isinstance(entry, _Failed):
            err = CaptureError(entry.message)
            err.fresh = False
            raise err
        return entry, False

    def _store(self, key, entry):
        self._items[key] = entry
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def values(self) -> list:
        """The captured entries (failures left out)."""
        return [e for e in self._items.values() if not isinstance(e, _Failed)]

    def __len__(self) -> int:
        return len(self._items)

    def clear(self):
        self._items.clear()
