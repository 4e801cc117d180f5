"""Small helpers every entry point shares: the model-output convention and the progress bar.

`model_output(out)`: the prediction in a model's return value. Models are called as `model(x, t)` and may return
the tensor itself or an object with `.sample` (diffusers' `UNet2DOutput`), so diffusers' `UNet2DModel` works as is.

`progress(it, enabled, **tqdm_kwargs)`: `it` wrapped in a tqdm bar when `enabled`, else `it` unchanged. With
`it=None` it returns a bar to `.update()` by hand (or None when disabled). `enabled` may be such a bar itself: then
`it` advances that bar by one per item (a sampling loop inside a longer job moves the job's bar at every step).
tqdm is a dependency, but a bare GPU box may lack it: then one warning says so and the work goes on without a bar.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a job (sampling to a directory, training); str() says what is kept on disk and how
    to go on. The command line prints it."""


def model_output(out: Any) -> Any:
    """`out.sample` when the model returned an object with one (diffusers' output classes), else `out`."""
    return getattr(out, "sample", out)


def progress(it: Iterable | None, enabled: bool, **tqdm_kwargs: Any):
    """A tqdm bar over `it` (or, with it=None, a bar to update by hand) when `enabled`; otherwise `it` itself."""
    if enabled is not True and callable(getattr(enabled, "update", None)):  # before bool(): tqdm defines it
        return _advancing(it, enabled)
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn("progress=True needs tqdm (pip install tqdm); continuing without a bar", stacklevel=3)
        return it
    return tqdm(it, **tqdm_kwargs) if it is not None else tqdm(**tqdm_kwargs)


def _advancing(it: Iterable, bar: Any):
    for item in it:
        yield item
        bar.update(1)


class deferred_signals:
    """`with deferred_signals():` Ctrl-C and SIGTERM that arrive inside the block take effect at its end, so a save
    in progress (a checkpoint and its train state, a finished batch) completes before the job unwinds. In a thread
    other than the main one (where handlers cannot be set) it does nothing."""

    def __init__(self):
        import signal

        self.signums = [signal.SIGINT, signal.SIGTERM]
        self.old: dict = {}
        self.pending: list[int] = []

    def __enter__(self):
        import signal

        try:
            for s in self.signums:
                self.old[s] = signal.signal(s, lambda signum, frame: self.pending.append(signum))
        except ValueError:  # not the main thread
            self.old.clear()
        return self

    def __exit__(self, *exc):
        import signal

        for s, h in self.old.items():
            signal.signal(s, h)
        for s in dict.fromkeys(self.pending):
            if self.old.get(s) != signal.SIG_IGN:
                signal.raise_signal(s)  # now, through the handler that was there before
        return False
