"""AlexNet with N towers, as in Krizhevsky, Sutskever & Hinton (NIPS 2012).

The paper trained on two GPUs; each GPU held one "tower" of half the kernels, and
the towers talked only at conv3 and the fully-connected layers (§3.5). Here the
towers of a layer run as one grouped convolution (``groups=num_towers``), so the
forward pass has no Python loop over towers, and tower ``k`` owns the ``k``-th
block of output channels of every layer.

The layer table (two towers, ``width_policy="split"``, sources in the README):

    layer  per tower  kernel/stride/pad  reads        then
    conv1  48         11/4/0             the image    ReLU, LRN, max-pool 3/2
    conv2  128        5/1/2              own tower    ReLU, LRN, max-pool 3/2
    conv3  192        3/1/1              all towers   ReLU
    conv4  192        3/1/1              own tower    ReLU
    conv5  128        3/1/1              own tower    ReLU, max-pool 3/2
    fc6    4096 total -                  all          ReLU, dropout 0.5
    fc7    4096 total -                  all          ReLU, dropout 0.5
    fc8    classes    -                  all          (softmax in the loss)
"""

import math
from collections import OrderedDict
from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from towers.lrn import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE, LocalResponseNorm

# Total widths of the paper's two-tower network (§3.5, Figure 2). Under
# width_policy="split" these totals are divided among the towers; under
# "per_tower" each tower keeps the paper's per-tower width (total / 2).
PAPER_WIDTHS = OrderedDict(conv1=96, conv2=256, conv3=384, conv4=384, conv5=256, fc6=4096, fc7=4096)
PAPER_NUM_TOWERS = 2

# Layers whose biases start at 1 rather than 0 (§5: "to accelerate the early
# stages of learning by providing the ReLUs with positive inputs").
POSITIVE_BIAS_LAYERS = ("conv2", "conv4", "conv5", "fc6", "fc7")


def tower_widths(num_towers: int, width_policy: str = "split", width_multiplier: float = 1.0) -> dict[str, int]:
    """Units per tower of every layer, or a ValueError that says what would work.

    ``split`` keeps the network's total width fixed whatever the tower count: each layer's total
    (the paper's 96/256/384/384/256/4096/4096 times ``width_multiplier``) is rounded to the nearest
    multiple of ``num_towers`` (halves up, at least ``num_towers``) and divided among the towers. Where
    the total divides evenly (1, 2, 4, 8 towers at full width) nothing is rounded; 3 towers get
    32/85/128/128/85/1365/1365 units each, totals 96/255/384/384/255/4095/4095. ``per_tower`` gives
    every tower the paper's per-tower width (total / 2, times ``width_multiplier``), which must be a
    whole number: the network grows with the tower count.
    """
    if num_towers < 1:
        raise ValueError(f"num_towers must be at least 1, got {num_towers}")
    if width_policy not in ("split", "per_tower"):
        raise ValueError(f"width_policy must be 'split' or 'per_tower', got {width_policy!r}")
    if width_multiplier <= 0:
        raise ValueError(f"width_multiplier must be positive, got {width_multiplier}")

    if width_policy == "split":
        # floor(x + 0.5): halves round up, documented and platform-independent (round() rounds to even)
        return {
            name: max(1, math.floor(total * width_multiplier / num_towers + 0.5))
            for name, total in PAPER_WIDTHS.items()
        }
    widths = {name: total * width_multiplier / PAPER_NUM_TOWERS for name, total in PAPER_WIDTHS.items()}
    bad = {name: w for name, w in widths.items() if w < 1 or w != int(w)}
    if bad:
        raise ValueError(
            f"width_policy='per_tower' with width_multiplier={width_multiplier} gives fractional or empty "
            f"towers: units per tower {bad}. Use a width_multiplier that makes the paper's per-tower widths "
            f"48/128/192/192/128/2048/2048 whole numbers, or width_policy='split' (rounds each layer's total "
            f"to a multiple of the tower count)."
        )
    return {name: int(w) for name, w in widths.items()}


def conv_output_size(image_size: int) -> int:
    """Side of the conv5 feature map after pool5 (227 -> 55 -> 27 -> 13 -> 6)."""
    side = (image_size - 11) // 4 + 1  # conv1
    for _ in range(3):  # pool1, pool2, pool5 (3x3, stride 2); conv2-5 keep the size
        side = (side - 3) // 2 + 1
    if side < 1:
        raise ValueError(f"image_size={image_size} is too small for AlexNet's conv stack (227 is the paper's)")
    return side


class GreyKernels(nn.Module):
    """Parametrisation of conv1's weight that makes the kernels of some towers grey (the positive control).

    ``weight = where(blind, a (a . w), w)``: the RGB 3-vector of every pixel of a blind kernel is projected
    onto the unit axis ``a`` (a buffer), the others pass unchanged. ``a`` is grey *in raw-RGB units*:
    (1, 1, 1)/sqrt(3) for raw inputs; for inputs divided by a per-channel std s, a raw-grey kernel has
    w_c / s_c equal for all c, so ``a`` = s/|s| (:meth:`TowerAlexNet.set_grey_axis`). The projection is
    linear and idempotent, so SGD with weight decay and momentum on the stored tensor moves the used
    weight exactly like SGD on it with the projected gradient: blind kernels stay grey to float rounding.
    """

    def __init__(self, blind: torch.Tensor):
        super().__init__()
        self.register_buffer("blind", blind.view(-1, 1, 1, 1), persistent=False)  # from the hyperparameters
        self.register_buffer("axis", torch.full((3,), 3**-0.5))  # saved: the weights were trained with it

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        a = self.axis.to(w.dtype).view(1, 3, 1, 1)
        grey = torch.where(self.blind, a * (a * w).sum(1, keepdim=True), w)
        if w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
            grey = grey.contiguous(memory_format=torch.channels_last)  # keep conv1 on the NHWC kernels
        return grey


class TowerAlexNet(nn.Module):
    """The paper's AlexNet with ``num_towers`` towers.

    Args:
        num_towers: towers (the paper's GPUs); 1 is the ungrouped network.
        num_classes: outputs of fc8.
        width_policy: ``"split"`` divides the paper's total widths among the towers;
            ``"per_tower"`` gives every tower the paper's per-tower widths (and
            2048 fully-connected units per tower), so the network grows with towers.
        width_multiplier: scales every width (CPU-scale models, the demo).
        image_size: input side; 227 is the paper's and gives 6x6 after pool5.
        dropout: dropout probability on the outputs of fc6 and fc7.
        conv1_lrn_before_relu: the 2012 code normalised conv1's output before its
            ReLU (layers-145.cfg); the paper's text puts LRN after the ReLU.
        lrn_across_towers: Caffe's bvlc_alexnet normalises all conv1 channels as one
            group, so its windows cross the tower boundary; the 2012 code did not.
        lrn_k, lrn_alpha, lrn_beta, lrn_size: the LRN constants.
        init_std: std of the N(0, std^2) initial weights (§5: 0.01).
        init_std_overrides: per-layer std, e.g. ``{"conv3": 0.03}`` (2012 code)
            or ``{"fc6": 0.005, "fc7": 0.005}`` (Caffe).
        positive_bias: initial bias of conv2, conv4, conv5, fc6 and fc7 (§5: 1; Caffe: 0.1).
        color_blind_towers: tower numbers (1-based) whose conv1 kernels are kept exactly grey throughout
            training (:class:`GreyKernels`, a parametrisation of ``features.conv1.weight``). A positive
            control for the measurement, not the paper: a run with ``[1]`` must be judged specialised,
            tower 1 agnostic. The state dict keeps the plain key ``features.conv1.weight`` (the grey
            weights) plus the grey axis, so checkpoints read like any other.
    """

    def __init__(
        self,
        num_towers: int = 2,
        num_classes: int = 2,
        width_policy: Literal["split", "per_tower"] = "split",
        width_multiplier: float = 1.0,
        image_size: int = 227,
        dropout: float = 0.5,
        conv1_lrn_before_relu: bool = False,
        lrn_across_towers: bool = False,
        lrn_k: float = LRN_K,
        lrn_alpha: float = LRN_ALPHA,
        lrn_beta: float = LRN_BETA,
        lrn_size: int = LRN_SIZE,
        init_std: float = 0.01,
        init_std_overrides: dict[str, float] | None = None,
        positive_bias: float = 1.0,
        color_blind_towers: list[int] | None = None,
    ):
        super().__init__()
        w = tower_widths(num_towers, width_policy, width_multiplier)
        unknown = set(init_std_overrides or {}) - set(PAPER_WIDTHS) - {"fc8"}
        if unknown:
            raise ValueError(
                f"init_std_overrides names unknown layers {sorted(unknown)}; layers are {list(PAPER_WIDTHS) + ['fc8']}"
            )
        self.num_towers = T = num_towers
        self.init_std, self.init_std_overrides, self.positive_bias = (
            init_std,
            dict(init_std_overrides or {}),
            positive_bias,
        )

        def lrn() -> LocalResponseNorm:
            return LocalResponseNorm(1 if lrn_across_towers else T, lrn_size, lrn_alpha, lrn_beta, lrn_k)

        conv1_block = [("norm1", lrn()), ("relu1", nn.ReLU(inplace=True))]
        if not conv1_lrn_before_relu:
            conv1_block.reverse()

        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(3, T * w["conv1"], 11, stride=4)),  # every tower reads all three colours
                    *conv1_block,
                    ("pool1", nn.MaxPool2d(3, stride=2)),  # overlapping pooling, §3.4
                    ("conv2", nn.Conv2d(T * w["conv1"], T * w["conv2"], 5, padding=2, groups=T)),  # own tower only
                    ("relu2", nn.ReLU(inplace=True)),
                    ("norm2", lrn()),
                    ("pool2", nn.MaxPool2d(3, stride=2)),
                    ("conv3", nn.Conv2d(T * w["conv2"], T * w["conv3"], 3, padding=1)),  # all towers: the crossing
                    ("relu3", nn.ReLU(inplace=True)),
                    ("conv4", nn.Conv2d(T * w["conv3"], T * w["conv4"], 3, padding=1, groups=T)),  # own tower only
                    ("relu4", nn.ReLU(inplace=True)),
                    ("conv5", nn.Conv2d(T * w["conv4"], T * w["conv5"], 3, padding=1, groups=T)),  # own tower only
                    ("relu5", nn.ReLU(inplace=True)),
                    ("pool5", nn.MaxPool2d(3, stride=2)),
                ]
            )
        )
        side = conv_output_size(image_size)
        fc_in = T * w["conv5"] * side * side
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("fc6", nn.Linear(fc_in, T * w["fc6"])),  # reads every tower
                    ("relu6", nn.ReLU(inplace=True)),
                    ("drop6", nn.Dropout(dropout)),  # §4.2: dropout on the outputs of fc6 and fc7
                    ("fc7", nn.Linear(T * w["fc6"], T * w["fc7"])),
                    ("relu7", nn.ReLU(inplace=True)),
                    ("drop7", nn.Dropout(dropout)),
                    ("fc8", nn.Linear(T * w["fc7"], num_classes)),
                ]
            )
        )
        self.color_blind_towers = sorted(set(color_blind_towers or ()))
        bad = [k for k in self.color_blind_towers if not 1 <= k <= T]
        if bad:
            raise ValueError(f"color_blind_towers {bad} are not tower numbers; towers are 1 ... {T}")
        if self.color_blind_towers:
            blind = torch.zeros(T, w["conv1"], dtype=torch.bool)
            blind[[k - 1 for k in self.color_blind_towers]] = True
            parametrize.register_parametrization(self.features.conv1, "weight", GreyKernels(blind.flatten()))
            self.register_state_dict_post_hook(_plain_conv1_key)
            self.register_load_state_dict_pre_hook(_parametrized_conv1_key)
        self.reset_parameters()

    def set_grey_axis(self, channel_std=None) -> None:
        """Make the colour-blind kernels grey in raw-RGB units for inputs divided by ``channel_std``
        (R, G, B; None: raw inputs). Call before training: it changes what the blind kernels are."""
        if not self.color_blind_towers:
            return
        axis = self.features.conv1.parametrizations.weight[0].axis
        std = torch.ones(3) if channel_std is None else torch.as_tensor(channel_std, dtype=torch.float64).flatten()
        if std.shape != (3,) or not bool(torch.isfinite(std).all()) or bool((std <= 0).any()):
            raise ValueError(f"channel_std must be three positive finite numbers (R, G, B), got {std.tolist()}")
        axis.copy_(std / std.norm())

    def reset_parameters(self) -> None:
        """§5: weights N(0, 0.01^2); biases 1 in conv2, conv4, conv5, fc6, fc7 and 0 elsewhere."""
        for name, layer in self.named_layers().items():
            weight = layer.parametrizations.weight.original if parametrize.is_parametrized(layer) else layer.weight
            nn.init.normal_(weight, 0.0, self.init_std_overrides.get(name, self.init_std))
            nn.init.constant_(layer.bias, self.positive_bias if name in POSITIVE_BIAS_LAYERS else 0.0)

    def named_layers(self) -> dict[str, nn.Module]:
        """The eight weight layers by the paper's names: conv1 ... conv5, fc6, fc7, fc8."""
        return {
            name: m
            for name, m in [*self.features.named_children(), *self.classifier.named_children()]
            if isinstance(m, (nn.Conv2d, nn.Linear))
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))

    def conv1_kernels(self) -> torch.Tensor:
        """First-layer weights as (towers, kernels per tower, 3, 11, 11), colour channels in RGB order."""
        weight = self.features.conv1.weight
        return weight.view(self.num_towers, weight.shape[0] // self.num_towers, *weight.shape[1:])


# With color_blind_towers, parametrize stores conv1's weight as `features.conv1.parametrizations.weight.original`.
# The state dict keeps the plain key with the used (grey) weights instead, so checkpoints, analysis/kernels.py
# and the tower-parallel layout read it like any other; loading puts it back as the stored tensor (the
# projection is idempotent, so the used weights are the same). A checkpoint without the switch loads too.
_ORIGINAL = "features.conv1.parametrizations.weight.original"
_AXIS = "features.conv1.parametrizations.weight.0.axis"


def _plain_conv1_key(module: TowerAlexNet, state_dict: dict, prefix: str, local_metadata) -> None:
    if prefix + _ORIGINAL in state_dict:
        original = state_dict.pop(prefix + _ORIGINAL)
        state_dict[prefix + "features.conv1.weight"] = module.features.conv1.parametrizations.weight[0](
            original
        ).detach()


def _parametrized_conv1_key(module: TowerAlexNet, state_dict: dict, prefix: str, *args) -> None:
    if prefix + "features.conv1.weight" in state_dict:
        state_dict[prefix + _ORIGINAL] = state_dict.pop(prefix + "features.conv1.weight")
    if prefix + _AXIS not in state_dict:  # a checkpoint trained without the switch: keep this model's axis
        state_dict[prefix + _AXIS] = module.features.conv1.parametrizations.weight[0].axis.clone()
