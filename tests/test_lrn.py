import numba
import pytest
import torch
from torch import nn

from towers.lrn import local_response_norm
from towers.model import TowerAlexNet

# The two implementations: compiled loops (CPU, float32/64, size 5, beta 3/4) and tensor operations.
BOTH = pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "tensor-ops"])
FORMATS = pytest.mark.parametrize(
    "memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"]
)


def lrn_by_the_formula(a, size, alpha, beta, k):
    """b_c = a_c / (k + alpha/n * sum_{j=max(0,c-n//2)}^{min(N-1,c+(n-1)//2)} a_j^2)^beta, written out per channel
    (the window of nn.LocalResponseNorm; for odd n it is the paper's c-n/2 ... c+n/2)."""
    n_channels = a.shape[1]
    out = torch.empty_like(a)
    for c in range(n_channels):
        lo, hi = max(0, c - size // 2), min(n_channels - 1, c + (size - 1) // 2)
        out[:, c] = a[:, c] / (k + alpha / size * (a[:, lo : hi + 1] ** 2).sum(1)) ** beta
    return out


def per_tower_formula(x, groups, size=5, alpha=1e-4, beta=0.75, k=2.0):
    return torch.cat([lrn_by_the_formula(t, size, alpha, beta, k) for t in x.chunk(groups, dim=1)], 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [1, 2, 4, 5, 6])
def test_tensor_ops_lrn_matches_the_formula_within_each_tower(groups, size, dtype):
    torch.manual_seed(0)
    a = torch.randn(2, 24, 5, 3, dtype=dtype) * 40
    got = local_response_norm(a, groups, size=size, alpha=1e-2, beta=0.75, k=2.0, compiled=False)
    torch.testing.assert_close(got, per_tower_formula(a, groups, size, 1e-2, 0.75, 2.0))


@FORMATS
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [2.0, 1.0])
def test_compiled_lrn_matches_the_formula_within_each_tower(groups, dtype, k, memory_format):
    torch.manual_seed(0)
    # 7 x 9 pixels: neither the channels_last tasks (64 pixels) nor the NCHW ones (256) divide them
    a = (torch.randn(3, 24, 7, 9, dtype=dtype) * 40).contiguous(memory_format=memory_format)
    got = local_response_norm(a, groups, alpha=1e-2, k=k, compiled=True)
    torch.testing.assert_close(got, per_tower_formula(a, groups, alpha=1e-2, k=k))
    assert got.is_contiguous(memory_format=memory_format)


@BOTH
def test_lrn_agrees_with_torch_for_one_group(compiled):
    a = torch.randn(3, 16, 7, 7, dtype=torch.float64) * 30
    torch.testing.assert_close(
        local_response_norm(a, 1, compiled=compiled), nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0)(a)
    )


@pytest.mark.parametrize(
    "groups, size, beta, k, compiled",
    [
        (1, 5, 0.75, 2.0, True),
        (2, 5, 0.75, 1.0, True),
        (3, 5, 0.75, 2.0, True),
        (4, 5, 0.75, 2.0, True),
        (1, 5, 0.75, 2.0, False),
        (2, 5, 0.75, 1.0, False),
        (3, 4, 0.5, 2.0, False),
        (4, 3, 1.0, 2.0, False),
        (2, 1, 0.75, 2.0, False),
    ],
)
@FORMATS
def test_lrn_gradient_is_the_formulas(groups, size, beta, k, compiled, memory_format):
    torch.manual_seed(0)
    a = (torch.randn(2, 12, 3, 4, dtype=torch.float64) * 20).contiguous(memory_format=memory_format).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: local_response_norm(t, groups, size, 1e-2, beta, k, compiled), (a,))
    # and equals autograd through the written-out formula, also in float32
    for dtype in (torch.float64, torch.float32):
        x = a.detach().to(dtype).requires_grad_()
        g = torch.randn_like(x)
        (ours,) = torch.autograd.grad(local_response_norm(x, groups, size, 1e-2, beta, k, compiled), x, g)
        (theirs,) = torch.autograd.grad(per_tower_formula(x, groups, size, 1e-2, beta, k), x, g)
        torch.testing.assert_close(ours, theirs)


@FORMATS
def test_compiled_and_tensor_ops_agree_on_the_papers_conv1_maps(memory_format):
    """The paper's norm1 shape (96 channels at 55 x 55, two towers), float32, forward and backward."""
    torch.manual_seed(0)
    x = (torch.randn(2, 96, 55, 55) * 30).relu().contiguous(memory_format=memory_format).requires_grad_()
    g = torch.randn(x.shape).contiguous(memory_format=memory_format)
    fast, slow = local_response_norm(x, 2, compiled=True), local_response_norm(x, 2, compiled=False)
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(torch.autograd.grad(fast, x, g)[0], torch.autograd.grad(slow, x, g)[0])


def test_lrn_picks_the_compiled_loops_where_they_apply():
    def implementation(x, **kwargs):
        return type(local_response_norm(x.requires_grad_(), 2, **kwargs).grad_fn).__name__

    x = torch.randn(2, 8, 3, 3)
    assert implementation(x) == "_CompiledLRNBackward"
    assert implementation(x.double()) == "_CompiledLRNBackward"
    assert implementation(x, size=3) == implementation(x, beta=0.5) == "_TensorOpsLRNBackward"
    assert implementation(x.to(torch.bfloat16)) == "_TensorOpsLRNBackward"
    assert implementation(x, compiled=False) == "_TensorOpsLRNBackward"
    with pytest.raises(ValueError, match="compiled=True needs .* size=5"):
        local_response_norm(x, 2, size=3, compiled=True)
    with pytest.raises(ValueError, match="compiled=True needs a float32 or float64 CPU tensor"):
        local_response_norm(x.half(), 2, compiled=True)


@BOTH
def test_lrn_takes_any_strides(compiled):
    torch.manual_seed(0)
    x = (torch.randn(2, 16, 6, 10, dtype=torch.float64) * 30)[:, :, :, ::2]  # neither NCHW nor channels_last
    x.requires_grad_()
    out = local_response_norm(x, 2, compiled=compiled)
    torch.testing.assert_close(out, per_tower_formula(x.detach(), 2))
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(per_tower_formula(x, 2), x, g)[0])


def test_compiled_lrn_uses_torchs_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        local_response_norm(torch.randn(2, 16, 6, 10), 2, compiled=True)
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


@BOTH
def test_lrn_in_channels_last_and_after_an_inplace_relu(compiled):
    torch.manual_seed(0)
    a = torch.randn(2, 8, 5, 5, dtype=torch.float64) * 30
    cl = a.contiguous(memory_format=torch.channels_last).requires_grad_()
    ref = a.clone().requires_grad_()
    out_cl, out_ref = local_response_norm(cl, 2, compiled=compiled), local_response_norm(ref, 2, compiled=compiled)
    torch.testing.assert_close(out_cl, out_ref)
    g = torch.randn_like(a)
    torch.testing.assert_close(torch.autograd.grad(out_cl, cl, g)[0], torch.autograd.grad(out_ref, ref, g)[0])
    # the model's order: ReLU in place, then LRN, then (code2012) an in-place ReLU on the LRN output
    model = TowerAlexNet(num_towers=2, width_multiplier=0.25, image_size=67, conv1_lrn_before_relu=True)
    model(torch.randn(2, 3, 67, 67)).sum().backward()
    assert model.features.conv1.weight.grad.abs().sum() > 0


def test_lrn_refuses_channels_that_do_not_split_into_towers():
    with pytest.raises(ValueError, match="divisible by groups=3"):
        local_response_norm(torch.randn(1, 8, 2, 2), 3)


@BOTH
def test_lrn_window_does_not_cross_towers(compiled):
    a = torch.zeros(1, 8, 1, 1)
    a[0, 4] = 100.0  # the first channel of tower 2
    out = local_response_norm(a.clone(), groups=2, compiled=compiled)
    # tower 1's last channel would be normalised by channel 4 if the window crossed
    assert out[0, 3] == 0
    crossing = local_response_norm(a + 1.0, groups=1, compiled=compiled)[0, 3]
    isolated = local_response_norm(a + 1.0, groups=2, compiled=compiled)[0, 3]
    assert crossing < isolated


def test_lrn_under_bf16_autocast_keeps_the_input_dtype():
    torch.manual_seed(0)
    a = torch.randn(2, 8, 4, 4) * 30
    x = a.to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = local_response_norm(x, 2)
    out.float().sum().backward()
    assert out.dtype == x.grad.dtype == torch.bfloat16
    exact = per_tower_formula(x.detach().double(), 2)
    torch.testing.assert_close(out.double(), exact, rtol=2e-2, atol=1e-2)
