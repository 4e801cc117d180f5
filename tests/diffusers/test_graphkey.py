"""fastdiff._graphkey.model_key: the identity of a model's weights (every parameter's and buffer's storage), the key
of every graph cache (fastdiff.optimize's U-Net graphs and compiled forwards; the sampling loop's CUDA graphs)."""
import torch


def test_model_key():
    from fastdiff._graphkey import model_key

    m = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4))
    k = model_key(m)
    assert k == model_key(m) and hash(k) == hash(model_key(m))
    with torch.no_grad():
        m[0].weight.add_(1.0)  # in place: same storage, same key
    assert model_key(m) == k
    m[0].weight = torch.nn.Parameter(m[0].weight.detach().clone())
    k2 = model_key(m)
    assert k2 != k
    m.load_state_dict({n: v.clone() for n, v in m.state_dict().items()}, assign=True)
    assert model_key(m) != k2
    k3 = model_key(m)
    m.double()
    assert model_key(m) != k3
    m[1].running_mean = torch.zeros(4, dtype=torch.float64)  # a buffer swapped
    assert model_key(m) != k3
    assert model_key(lambda x: x) == ()
