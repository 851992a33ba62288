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

from collections import OrderedDict
from typing import Literal

import torch
from torch import nn

# Total widths of the paper's two-tower network (§3.5, Figure 2). Under
# width_policy="split" these totals are divided among the towers; under
# "per_tower" each tower keeps the paper's per-tower width (total / 2).
PAPER_WIDTHS = OrderedDict(conv1=96, conv2=256, conv3=384, conv4=384, conv5=256, fc6=4096, fc7=4096)
PAPER_NUM_TOWERS = 2

# Layers whose biases start at 1 rather than 0 (§5: "to accelerate the early
# stages of learning by providing the ReLUs with positive inputs").
POSITIVE_BIAS_LAYERS = ("conv2", "conv4", "conv5", "fc6", "fc7")

# Local response normalisation (§3.3 and the 2012 code's "cmrnorm" layer):
# b = a / (k + (alpha / size) * sum of a^2 over `size` adjacent channels) ** beta.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0


def _window_matrix(channels: int, size: int, scale: float, like: torch.Tensor) -> torch.Tensor:
    """(channels, channels) band matrix: ``scale`` where j - c is in nn.LocalResponseNorm's window
    [-(size // 2), (size - 1) // 2], else 0; ``matrix @ a`` sums ``a`` over every channel's window."""
    c = torch.arange(channels, device=like.device)
    offset = c[None, :] - c[:, None]
    return ((offset >= -(size // 2)) & (offset <= (size - 1) // 2)).to(like.dtype) * scale


def _over_channels(matrix: torch.Tensor, a: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``matrix`` applied along the channel dim of ``a`` (one batched matmul, no loop):
    ``a`` is (batch * groups, channels, h * w), or (batch * h * w, groups, channels) if channels last."""
    if channels_last:  # one (batch * h * w * groups, channels) @ (channels, channels) product, not a bmm of tiny ones
        return torch.mm(a.reshape(-1, a.shape[-1]), matrix.T).view(a.shape)
    return matrix @ a


def _tower_view(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, bool]:
    """A view of (b, c, h, w) with each tower's channels along one dim (see _over_channels)."""
    b, c, h, w = x.shape
    if x.is_contiguous():
        return x.view(b * groups, c // groups, h * w), False
    if x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).view(b * h * w, groups, c // groups), True
    return x.contiguous().view(b * groups, c // groups, h * w), False


def _inverse_power(d: torch.Tensor, beta: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """d ** -beta. For the paper's beta = 3/4 it is d^(1/4) / d from two square roots and a division:
    three cheap passes where a general ``pow`` costs several times more on the CPU (BENCHMARKS.md)."""
    if beta == 0.75:
        return torch.sqrt(d, out=out).sqrt_().div_(d)
    return torch.pow(d, -beta, out=out)


class _LocalResponseNorm(torch.autograd.Function):
    """LRN with a hand-derived backward. With d_c = k + (alpha/n) sum_{j in W(c)} a_j^2 and
    b_c = a_c d_c^-beta:

        dL/da_c = g_c d_c^-beta - (2 alpha beta / n) a_c sum_{j: c in W(j)} g_j a_j d_j^(-beta-1)

    The window sums are one matmul with a band matrix (its transpose in the backward): fewer passes
    over the activation than shifted adds, and none of the padded copies. It saves only the input
    (kept alive anyway by the ReLU before it) and d, where autograd through the formula keeps half a
    dozen activation-sized tensors. Every step writes into a tensor it already holds where it can:
    on the CPU a fresh activation-sized tensor costs as much as an elementwise pass (page faults).
    """

    @staticmethod
    def forward(ctx, x, groups, size, alpha, beta, k):
        with torch.autocast(x.device.type, enabled=False):  # in x's dtype, as the layers around it
            a, channels_last = _tower_view(x, groups)
            window = _window_matrix(a.shape[-2] if not channels_last else a.shape[-1], size, alpha / size, a)
            # a fresh tensor, not a view of a reshaped result: code2012's in-place ReLU follows it
            out = torch.empty_like(x, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            b = _tower_view(out, groups)[0]
            d = _over_channels(window, torch.mul(a, a, out=b), channels_last).add_(k)  # a^2 held in out's memory
            _inverse_power(d, beta, out=b).mul_(a)
        ctx.save_for_backward(x, d, window)
        ctx.lrn = groups, beta, channels_last
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, d, window = ctx.saved_tensors
        groups, beta, channels_last = ctx.lrn
        with torch.autocast(x.device.type, enabled=False):
            a = _tower_view(x, groups)[0]
            g = _tower_view(grad_out.contiguous(memory_format=torch.channels_last if channels_last
                                                 else torch.contiguous_format), groups)[0]
            grad = _inverse_power(d, beta).mul_(g)  # g d^-beta
            spread = torch.mul(grad, a).div_(d)  # g a d^(-beta-1)
            spread = _over_channels(window.T, spread, channels_last)  # the transposed window, times alpha/n
            grad.addcmul_(a, spread, value=-2 * beta)
        b, c, h, w = x.shape
        if channels_last:
            return grad.view(b, h, w, c).permute(0, 3, 1, 2), None, None, None, None, None
        return grad.view(b, c, h, w), None, None, None, None, None


def local_response_norm(x: torch.Tensor, groups: int, size: int = LRN_SIZE, alpha: float = LRN_ALPHA,
                        beta: float = LRN_BETA, k: float = LRN_K) -> torch.Tensor:
    """Cross-channel LRN whose window never leaves its group of channels.

    Same formula as ``nn.LocalResponseNorm`` (channels past an edge count as zero;
    the window of channel c is c - size//2 ... c + (size-1)//2), but ``groups``
    keeps each tower's normalisation inside that tower, as the 2012 code did (one
    GPU each), and it is computed with a band matrix and a hand-written backward
    instead of an ``avg_pool3d`` and autograd: several times faster on the CPU
    (BENCHMARKS.md).
    """
    if x.dim() != 4 or x.shape[1] % groups:
        raise ValueError(f"local_response_norm needs (batch, channels, height, width) with channels divisible by "
                         f"groups={groups}; got shape {tuple(x.shape)}")
    return _LocalResponseNorm.apply(x, groups, size, alpha, beta, k)


class LocalResponseNorm(nn.Module):
    """``local_response_norm`` as a layer; ``groups=1`` lets the window cross towers (Caffe)."""

    def __init__(self, groups: int, size: int = LRN_SIZE, alpha: float = LRN_ALPHA, beta: float = LRN_BETA,
                 k: float = LRN_K):
        super().__init__()
        self.groups, self.size, self.alpha, self.beta, self.k = groups, size, alpha, beta, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return local_response_norm(x, self.groups, self.size, self.alpha, self.beta, self.k)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


def tower_widths(num_towers: int, width_policy: str = "split", width_multiplier: float = 1.0) -> dict[str, int]:
    """Units per tower of every layer, or a ValueError that says what would work."""
    if num_towers < 1:
        raise ValueError(f"num_towers must be at least 1, got {num_towers}")
    if width_policy not in ("split", "per_tower"):
        raise ValueError(f"width_policy must be 'split' or 'per_tower', got {width_policy!r}")
    if width_multiplier <= 0:
        raise ValueError(f"width_multiplier must be positive, got {width_multiplier}")

    def per_tower(total: int, towers: int) -> float:
        divisor = towers if width_policy == "split" else PAPER_NUM_TOWERS
        return total * width_multiplier / divisor

    widths = {name: per_tower(total, num_towers) for name, total in PAPER_WIDTHS.items()}
    bad = {name: w for name, w in widths.items() if w < 1 or w != int(w)}
    if bad:
        working = [t for t in range(1, 17)
                   if all(v >= 1 and v == int(v) for v in (per_tower(PAPER_WIDTHS[n], t) for n in bad))]
        raise ValueError(
            f"{num_towers} towers with width_policy={width_policy!r} and width_multiplier={width_multiplier} "
            f"give fractional or empty towers: units per tower {bad}. "
            f"Tower counts that work with these settings: {working or 'none up to 16'}; "
            f"or use width_policy='per_tower' (every tower keeps the paper's 48/128/192/192/128 kernels), "
            f"or a width_multiplier that makes each layer's units divisible by {num_towers}.")
    return {name: int(w) for name, w in widths.items()}


def conv_output_size(image_size: int) -> int:
    """Side of the conv5 feature map after pool5 (227 -> 55 -> 27 -> 13 -> 6)."""
    side = (image_size - 11) // 4 + 1  # conv1
    for _ in range(3):  # pool1, pool2, pool5 (3x3, stride 2); conv2-5 keep the size
        side = (side - 3) // 2 + 1
    if side < 1:
        raise ValueError(f"image_size={image_size} is too small for AlexNet's conv stack (227 is the paper's)")
    return side


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
    ):
        super().__init__()
        w = tower_widths(num_towers, width_policy, width_multiplier)
        unknown = set(init_std_overrides or {}) - set(PAPER_WIDTHS) - {"fc8"}
        if unknown:
            raise ValueError(f"init_std_overrides names unknown layers {sorted(unknown)}; "
                             f"layers are {list(PAPER_WIDTHS) + ['fc8']}")
        self.num_towers = T = num_towers
        self.init_std, self.init_std_overrides, self.positive_bias = init_std, dict(init_std_overrides or {}), positive_bias

        def lrn() -> LocalResponseNorm:
            return LocalResponseNorm(1 if lrn_across_towers else T, lrn_size, lrn_alpha, lrn_beta, lrn_k)

        conv1_block = [("norm1", lrn()), ("relu1", nn.ReLU(inplace=True))]
        if not conv1_lrn_before_relu:
            conv1_block.reverse()

        self.features = nn.Sequential(OrderedDict([
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
        ]))
        side = conv_output_size(image_size)
        fc_in = T * w["conv5"] * side * side
        self.classifier = nn.Sequential(OrderedDict([
            ("fc6", nn.Linear(fc_in, T * w["fc6"])),  # reads every tower
            ("relu6", nn.ReLU(inplace=True)),
            ("drop6", nn.Dropout(dropout)),  # §4.2: dropout on the outputs of fc6 and fc7
            ("fc7", nn.Linear(T * w["fc6"], T * w["fc7"])),
            ("relu7", nn.ReLU(inplace=True)),
            ("drop7", nn.Dropout(dropout)),
            ("fc8", nn.Linear(T * w["fc7"], num_classes)),
        ]))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """§5: weights N(0, 0.01^2); biases 1 in conv2, conv4, conv5, fc6, fc7 and 0 elsewhere."""
        for name, layer in self.named_layers().items():
            nn.init.normal_(layer.weight, 0.0, self.init_std_overrides.get(name, self.init_std))
            nn.init.constant_(layer.bias, self.positive_bias if name in POSITIVE_BIAS_LAYERS else 0.0)

    def named_layers(self) -> dict[str, nn.Module]:
        """The eight weight layers by the paper's names: conv1 ... conv5, fc6, fc7, fc8."""
        return {name: m for name, m in [*self.features.named_children(), *self.classifier.named_children()]
                if isinstance(m, (nn.Conv2d, nn.Linear))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))

    def conv1_kernels(self) -> torch.Tensor:
        """First-layer weights as (towers, kernels per tower, 3, 11, 11), colour channels in RGB order."""
        weight = self.features.conv1.weight
        return weight.view(self.num_towers, weight.shape[0] // self.num_towers, *weight.shape[1:])
