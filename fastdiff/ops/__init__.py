"""One module per op: the plain-PyTorch reference (`*_ref`), the Triton kernel, and the dispatch."""
