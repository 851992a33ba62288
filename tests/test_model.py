import pytest
import torch

from towers.model import PAPER_WIDTHS, TowerAlexNet, tower_widths


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


def test_impossible_widths_are_refused_with_a_suggestion():
    with pytest.raises(ValueError, match=r"per_tower.*fractional.*width_policy='split'"):
        TowerAlexNet(width_policy="per_tower", width_multiplier=0.3)
    with pytest.raises(ValueError, match="at least 1"):
        TowerAlexNet(num_towers=0)
    with pytest.raises(ValueError, match="unknown layers"):
        TowerAlexNet(init_std_overrides={"conv9": 0.1})
    assert TowerAlexNet(num_towers=3, width_policy="per_tower").conv1_kernels().shape == (3, 48, 3, 11, 11)


def test_split_rounds_each_total_to_a_multiple_of_the_tower_count():
    # 3 towers: 256/3 = 85.3 -> 85 per tower (total 255), 4096/3 -> 1365 (4095); 96 and 384 divide evenly
    assert tower_widths(3, "split") == dict(conv1=32, conv2=85, conv3=128, conv4=128, conv5=85, fc6=1365, fc7=1365)
    # the totals stay within T/2 of the paper's at every count, and every tower gets at least one unit
    for towers in range(1, 13):
        widths = tower_widths(towers, "split")
        for name, total in PAPER_WIDTHS.items():
            assert abs(towers * widths[name] - total) <= towers / 2, (towers, name)
    assert tower_widths(5, "split")["conv1"] == 19  # 96/5 = 19.2
    assert tower_widths(7, "split", 0.125)["conv1"] == 2  # 12/7 = 1.7
    assert tower_widths(16, "split", 0.125)["conv1"] == 1  # 12/16 = 0.75: at least one kernel per tower
    assert TowerAlexNet(num_towers=3).conv1_kernels().shape == (3, 32, 3, 11, 11)


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
