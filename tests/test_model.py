import pytest
import torch
from torch import nn

from towers.model import TowerAlexNet, local_response_norm, tower_widths


def stage_shapes(model, x):
    shapes = {}
    for name, layer in model.features.named_children():
        x = layer(x)
        shapes[name] = tuple(x.shape[1:])
    return shapes


def test_shape_after_every_stage_is_the_papers():
    model = TowerAlexNet(num_towers=2, num_classes=1000)
    shapes = stage_shapes(model, torch.randn(1, 3, 227, 227))
    assert shapes["conv1"] == (96, 55, 55)
    assert shapes["pool1"] == (96, 27, 27)
    assert shapes["conv2"] == (256, 27, 27)
    assert shapes["pool2"] == (256, 13, 13)
    assert shapes["conv3"] == (384, 13, 13)
    assert shapes["conv4"] == (384, 13, 13)
    assert shapes["conv5"] == (256, 13, 13)
    assert shapes["pool5"] == (256, 6, 6)
    assert model.classifier.fc6.in_features == 256 * 6 * 6
    assert model.classifier.fc6.out_features == model.classifier.fc7.out_features == 4096
    assert model(torch.randn(2, 3, 227, 227)).shape == (2, 1000)


@pytest.mark.parametrize("num_towers, expected", [(2, 60_965_224), (1, 62_378_344)])
def test_parameter_counts_match_caffe_bvlc_alexnet(num_towers, expected):
    model = TowerAlexNet(num_towers=num_towers, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_connectivity_follows_section_3_5():
    model = TowerAlexNet(num_towers=4, num_classes=2)
    layers = model.named_layers()
    assert layers["conv1"].groups == 1 and layers["conv1"].in_channels == 3  # each tower sees RGB
    assert layers["conv2"].groups == layers["conv4"].groups == layers["conv5"].groups == 4
    assert layers["conv3"].groups == 1


def test_tower_isolation():
    torch.manual_seed(0)
    model = TowerAlexNet(num_towers=2, num_classes=2).eval()
    x = torch.randn(2, 3, 227, 227) * 50
    f = model.features

    def through(upto):
        out = x
        for name, layer in f.named_children():
            out = layer(out)
            if name == upto:
                return out

    conv2_before, conv3_before = through("conv2"), through("conv3")
    with torch.no_grad():
        model.conv1_kernels()[1].normal_(0, 0.05)  # change tower 2's first-layer kernels only
    conv2_after, conv3_after = through("conv2"), through("conv3")
    half = conv2_before.shape[1] // 2
    assert torch.equal(conv2_before[:, :half], conv2_after[:, :half])  # tower 1 untouched
    assert not torch.allclose(conv2_before[:, half:], conv2_after[:, half:])
    assert not torch.allclose(conv3_before[:, :half], conv3_after[:, :half])  # conv3 reads both towers


def test_conv1_kernels_are_a_view_in_tower_order():
    model = TowerAlexNet(num_towers=4, num_classes=2)
    kernels = model.conv1_kernels()
    assert kernels.shape == (4, 24, 3, 11, 11)
    assert torch.equal(kernels[2, 5], model.features.conv1.weight[2 * 24 + 5])
    assert kernels.data_ptr() == model.features.conv1.weight.data_ptr()


def lrn_by_the_formula(a, size, alpha, beta, k):
    """b_c = a_c / (k + alpha/n * sum_{j=max(0,c-n//2)}^{min(N-1,c+(n-1)//2)} a_j^2)^beta, written out per channel
    (the window of nn.LocalResponseNorm; for odd n it is the paper's c-n/2 ... c+n/2)."""
    n_channels = a.shape[1]
    out = torch.empty_like(a)
    for c in range(n_channels):
        lo, hi = max(0, c - size // 2), min(n_channels - 1, c + (size - 1) // 2)
        out[:, c] = a[:, c] / (k + alpha / size * (a[:, lo:hi + 1] ** 2).sum(1)) ** beta
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("groups", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [1, 2, 4, 5, 6])
def test_lrn_matches_the_formula_within_each_tower(groups, size, dtype):
    torch.manual_seed(0)
    a = torch.randn(2, 24, 5, 3, dtype=dtype) * 40
    got = local_response_norm(a, groups, size=size, alpha=1e-2, beta=0.75, k=2.0)
    per_tower = [lrn_by_the_formula(t, size, 1e-2, 0.75, 2.0) for t in a.chunk(groups, dim=1)]
    torch.testing.assert_close(got, torch.cat(per_tower, 1))


@pytest.mark.parametrize("size", [3, 5, 6])
def test_lrn_agrees_with_torch_for_one_group(size):
    a = torch.randn(3, 16, 7, 7, dtype=torch.float64) * 30
    torch.testing.assert_close(local_response_norm(a, 1, size), nn.LocalResponseNorm(size, 1e-4, 0.75, 2.0)(a))


@pytest.mark.parametrize("groups, size, beta, k", [(1, 5, 0.75, 2.0), (2, 5, 0.75, 1.0), (3, 4, 0.5, 2.0),
                                                    (4, 3, 1.0, 2.0), (2, 1, 0.75, 2.0)])
def test_lrn_gradient_is_the_formulas(groups, size, beta, k):
    torch.manual_seed(0)
    a = (torch.randn(2, 12, 3, 4, dtype=torch.float64) * 20).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: local_response_norm(t, groups, size, 1e-2, beta, k), (a,))
    # and equals autograd through the written-out formula, also in float32
    for dtype in (torch.float64, torch.float32):
        x = a.detach().to(dtype).requires_grad_()
        g = torch.randn_like(x)
        ours, = torch.autograd.grad(local_response_norm(x, groups, size, 1e-2, beta, k), x, g)
        formula = torch.cat([lrn_by_the_formula(t, size, 1e-2, beta, k) for t in x.chunk(groups, dim=1)], 1)
        theirs, = torch.autograd.grad(formula, x, g)
        torch.testing.assert_close(ours, theirs)


def test_lrn_in_channels_last_and_after_an_inplace_relu():
    torch.manual_seed(0)
    a = torch.randn(2, 8, 5, 5, dtype=torch.float64) * 30
    cl = a.contiguous(memory_format=torch.channels_last).requires_grad_()
    ref = a.clone().requires_grad_()
    out_cl, out_ref = local_response_norm(cl, 2), local_response_norm(ref, 2)
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


def test_lrn_window_does_not_cross_towers():
    a = torch.zeros(1, 8, 1, 1)
    a[0, 4] = 100.0  # the first channel of tower 2
    out = local_response_norm(a.clone(), groups=2)
    # tower 1's last channel would be normalised by channel 4 if the window crossed
    assert out[0, 3] == 0
    crossing = local_response_norm(a + 1.0, groups=1)[0, 3]
    isolated = local_response_norm(a + 1.0, groups=2)[0, 3]
    assert crossing < isolated


def test_impossible_widths_are_refused_with_a_suggestion():
    with pytest.raises(ValueError, match=r"Tower counts that work.*\[1, 2, 4, 8, 16\].*per_tower"):
        TowerAlexNet(num_towers=3)
    with pytest.raises(ValueError, match="at least 1"):
        TowerAlexNet(num_towers=0)
    with pytest.raises(ValueError, match="unknown layers"):
        TowerAlexNet(init_std_overrides={"conv9": 0.1})
    assert TowerAlexNet(num_towers=3, width_policy="per_tower").conv1_kernels().shape == (3, 48, 3, 11, 11)


def test_width_policies_agree_at_two_towers():
    assert tower_widths(2, "split") == tower_widths(2, "per_tower")
    assert tower_widths(4, "split")["conv1"] == 24
    assert tower_widths(4, "per_tower")["conv1"] == 48
    assert tower_widths(2, "split", 0.25) == dict(conv1=12, conv2=32, conv3=48, conv4=48, conv5=32, fc6=512, fc7=512)


def test_initialisation_of_section_5():
    torch.manual_seed(0)
    model = TowerAlexNet(num_towers=2, num_classes=1000, init_std_overrides={"conv3": 0.03})
    layers = model.named_layers()
    for name in ("conv2", "conv4", "conv5", "fc6", "fc7"):
        assert torch.all(layers[name].bias == 1.0), name
    for name in ("conv1", "conv3", "fc8"):
        assert torch.all(layers[name].bias == 0.0), name
    assert abs(layers["fc6"].weight.std().item() - 0.01) < 2e-4
    assert abs(layers["conv3"].weight.std().item() - 0.03) < 5e-4


def test_lrn_placement_switches():
    paper = [n for n, _ in TowerAlexNet().features.named_children()]
    code2012 = [n for n, _ in TowerAlexNet(conv1_lrn_before_relu=True).features.named_children()]
    assert paper[:4] == ["conv1", "relu1", "norm1", "pool1"]
    assert code2012[:4] == ["conv1", "norm1", "relu1", "pool1"]
    assert TowerAlexNet(lrn_across_towers=True).features.norm1.groups == 1
    assert TowerAlexNet().features.norm1.groups == 2


def test_lrn_under_bf16_autocast_keeps_the_input_dtype():
    torch.manual_seed(0)
    a = torch.randn(2, 8, 4, 4) * 30
    x = a.to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = local_response_norm(x, 2)
    out.float().sum().backward()
    assert out.dtype == x.grad.dtype == torch.bfloat16
    exact = torch.cat([lrn_by_the_formula(t, 5, 1e-4, 0.75, 2.0) for t in x.detach().double().chunk(2, 1)], 1)
    torch.testing.assert_close(out.double(), exact, rtol=2e-2, atol=1e-2)
