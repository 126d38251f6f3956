"""The loss math lives once, in ``sdpo_fast.loss.group_loss_and_grad``; the native backend's tile loop
runs a C++ copy of it (``group_loss_grad`` in csrc/sdpo_loss.cpp, in double). This holds the two
together: same loss and dL/dlogp on masked, variable-K, extreme and SFT-weighted groups, for every
loss type (the C++ takes the type as its position in ``LOSS_TYPES``)."""

import os

import pytest
import torch

from sdpo_fast.loss import LOSS_TYPES, group_loss_and_grad, loss_code

if os.environ.get("SDPO_FAST_NO_EXT", "0") not in ("", "0"):
    pytest.skip("SDPO_FAST_NO_EXT is set: the native extension is deliberately absent", allow_module_level=True)

from sdpo_fast.kernels.extension import extension  # noqa: E402


def groups(seed, G=64, C=7, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    logps = -torch.rand(G, C, generator=gen) * 20 * scale
    ref = -torch.rand(G, C, generator=gen) * 20 * scale
    k = torch.randint(0, C, (G,), generator=gen)  # 0..C-1 negatives, masked after them
    mask = torch.arange(C)[None, :] <= k[:, None]
    lens = torch.randint(1, 9, (G, C), generator=gen) * mask
    logps[::5, 1] = logps[::5, 0]  # ties with the chosen item (the dynamic loss's boundary is >=)
    logps[1::7, 1:] = logps[1::7, 1:2]  # tied negatives
    return logps * mask, ref * mask, mask, lens


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta,sft_weight", [(1.0, 0.0), (0.1, 0.5), (5.0, 1.0)])
@pytest.mark.parametrize("scale", [0.01, 1.0, 30.0], ids=["close", "typical", "extreme"])
def test_cpp_group_loss_is_the_mirror_of_the_python_one(beta, sft_weight, scale, loss_type):
    logps, ref, mask, lens = groups(int(beta * 10 + scale), scale=scale)
    loss_py, grad_py = group_loss_and_grad(logps, ref, mask, lens, beta, sft_weight, loss_type)
    loss_cc, grad_cc = extension.group_loss(logps, ref, mask, lens, beta, sft_weight, loss_code(loss_type))
    assert torch.isfinite(loss_cc).all() and torch.isfinite(grad_cc).all()
    torch.testing.assert_close(loss_cc, loss_py, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_cc, grad_py, rtol=1e-5, atol=1e-6)
    assert (grad_cc[~mask] == 0).all()


def test_cpp_group_loss_refuses_an_unknown_loss_code():
    logps, ref, mask, lens = groups(0)
    with pytest.raises(RuntimeError, match="unknown loss_type code 9"):
        extension.group_loss(logps, ref, mask, lens, 1.0, 0.0, 9)
