"""Small helpers every entry point shares: the model-output convention and the progress bar.

`model_output(out)`: the prediction in a model's return value. Models are called as `model(x, t)` and may return
the tensor itself or an object with `.sample` (diffusers' `UNet2DOutput`), so diffusers' `UNet2DModel` works as is.

`progress(it, enabled, **tqdm_kwargs)`: `it` wrapped in a tqdm bar when `enabled`, else `it` unchanged. With
`it=None` it returns a bar to `.update()` by hand (or None when disabled). tqdm is a dependency, but a bare GPU box
may lack it: then one warning says so and the work goes on without a bar.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable


def model_output(out: Any) -> Any:
    """`out.sample` when the model returned an object with one (diffusers' output classes), else `out`."""
    return getattr(out, "sample", out)


def progress(it: Iterable | None, enabled: bool, **tqdm_kwargs: Any):
    """A tqdm bar over `it` (or, with it=None, a bar to update by hand) when `enabled`; otherwise `it` itself."""
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn("progress=True needs tqdm (pip install tqdm); continuing without a bar", stacklevel=3)
        return it
    return tqdm(it, **tqdm_kwargs) if it is not None else tqdm(**tqdm_kwargs)
