"""Tower parallelism: tower ``k`` of a TowerAlexNet on device ``k``, as the paper's two GPUs (§3.2).

    python train.py fit --config configs/paper.yaml \\
        --trainer.strategy towers.TowerParallelStrategy --trainer.accelerator gpu --trainer.devices 2

How it works. :class:`~towers.model.TowerAlexNet` stays the one model: all towers of a layer are
one grouped convolution, and its ``state_dict`` (``model.features.conv1.weight`` of shape
``(T*K, 3, 11, 11)``, ...) is the checkpoint format of every mode. When training starts,
:class:`TowerParallelStrategy` swaps each TowerAlexNet in the LightningModule for a
:class:`TowerParallelAlexNet` built from it:

* Tower ``k`` goes to device ``k % D`` (round-robin when there are more towers than devices).
  The towers that share a device run as one smaller grouped network there, so there is one
  Python call per device and layer, never one per tower.
* Each device holds real ``nn.Conv2d`` layers with that device's slices of the grouped weights:
  conv1, conv2, conv4, conv5 (with their ReLU, LRN and pooling) see only their own towers.
* Activations move between devices only where the architecture crosses towers (§3.5): before
  conv3 every device gathers all towers' conv2 maps, and before fc6 the head device (the first
  one) gathers all conv5 maps. The fully-connected layers run on the head device, where the batch,
  the loss and the metrics also live.
* Gathered maps are concatenated in *device* order (towers 0, 2 | 1, 3 for four towers on two
  devices). Instead of reordering activations at every step, the input columns of conv3 and fc6 are
  permuted once, when the weights are loaded, to that order.
* ``state_dict()`` and ``load_state_dict()`` speak TowerAlexNet's keys and shapes: a state-dict
  post-hook concatenates the slices back into the grouped tensors (on the head device) and a
  load pre-hook slices grouped tensors into the per-device layers. A checkpoint written in
  single-device, DDP or tower-parallel mode therefore loads in any of them.

The optimizer is built after the swap, so it steps the placed parameters themselves. Its state
(momentum buffers) is per placed parameter: resuming a run (``ckpt_path``) works within the same
mode and device count; across modes load the weights only (``TowerClassifier.load_from_checkpoint``).

Why the swap happens in ``model_to_device``: Lightning's single-device strategies move the whole
LightningModule to one device in ``Strategy.setup`` -> ``model_to_device()``, after the precision
plugin has converted the module and before ``configure_optimizers`` runs. Placing towers there,
after that move, means nothing moves them back, the optimizer sees the placed parameters, and the
LightningModule needs no code for it (``configure_model`` would run before the move and be undone).
``teardown`` moves everything to the CPU as for any strategy; the next ``fit``/``validate`` places
the towers again.
"""

import copy
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from towers.lrn import LocalResponseNorm
from towers.model import TowerAlexNet

# The two places where tower-parallel AlexNet moves activations between devices (§3.5): conv3 reads
# every tower's conv2 maps, fc6 reads every tower's conv5 maps.
CROSSINGS = ("conv3", "fc6")


def tower_blocks(t: torch.Tensor, dim: int, towers: Sequence[int], num_towers: int) -> torch.Tensor:
    """The blocks ``towers`` of the ``num_towers`` equal blocks of ``t`` along ``dim``, concatenated in that order."""
    blocks = t.chunk(num_towers, dim)
    return torch.cat([blocks[k] for k in towers], dim)


def _layer_for_device(layer: nn.Module, towers_here: int, num_towers: int, dtype: torch.dtype) -> nn.Module:
    """The part of a features layer that runs ``towers_here`` of the ``num_towers`` towers on one device.

    Convolutions are created empty on the meta device (no initialisation, no RNG draws): their
    weights are loaded from the grouped model right after.
    """
    if isinstance(layer, nn.Conv2d):
        if layer.groups not in (1, num_towers):
            raise ValueError(f"a convolution with groups={layer.groups} is neither per tower nor across towers")
        own_tower = layer.groups == num_towers  # conv2, conv4, conv5 (and every conv of a one-tower net)
        return nn.Conv2d(
            layer.in_channels // num_towers * towers_here if own_tower else layer.in_channels,
            layer.out_channels // num_towers * towers_here,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            groups=towers_here if own_tower else 1,
            device="meta",
            dtype=dtype,
        )
    if isinstance(layer, LocalResponseNorm):
        if layer.groups != num_towers:
            raise ValueError(
                "lrn_across_towers=True normalises conv1's channels across the tower boundary (Caffe), which "
                "needs every tower's maps on one device before conv3; train it on one device or with DDP"
            )
        return LocalResponseNorm(towers_here, layer.size, layer.alpha, layer.beta, layer.k)
    return layer  # ReLU, max-pooling: no state


class TowerParallelAlexNet(nn.Module):
    """A :class:`TowerAlexNet` whose towers live on ``devices`` (see the module docstring).

    Args:
        model: the TowerAlexNet to place; its weights are copied, it is left unchanged.
        devices: one device per tower slot; tower ``k`` runs on ``devices[k % len(devices)]``.
            The first is the head device (input, fully-connected layers, output).
    """

    def __init__(self, model: TowerAlexNet, devices: Sequence[str | torch.device]):
        super().__init__()
        T = self.num_towers = model.num_towers
        if not devices:
            raise ValueError("TowerParallelAlexNet needs at least one device")
        if len(devices) > T:
            rank_zero_warn(f"{len(devices)} devices for {T} towers: devices {list(devices)[T:]} stay idle")
        self.devices = [torch.device(d) for d in devices][:T]
        D = len(self.devices)
        self.towers_on_device = [list(range(d, T, D)) for d in range(D)]  # round-robin: tower k on device k % D
        self.order = [k for towers in self.towers_on_device for k in towers]  # tower order of gathered maps

        features = OrderedDict(model.features.named_children())
        names = list(features)
        if "conv3" not in features or features["conv3"].groups != 1:
            raise ValueError("TowerParallelAlexNet expects TowerAlexNet's layers, with conv3 reading all towers")
        split = names.index("conv3")
        dtype = model.features.conv1.weight.dtype

        def stage(layer_names: list[str]) -> nn.ModuleList:
            return nn.ModuleList(
                nn.Sequential(
                    OrderedDict(
                        (name, _layer_for_device(features[name], len(towers), T, dtype)) for name in layer_names
                    )
                )
                for towers in self.towers_on_device
            )

        self.conv1_to_pool2 = stage(names[:split])  # [d]: own towers only
        self.conv3_to_pool5 = stage(names[split:])  # [d]: conv3 reads every tower, then own towers
        self.conv_names = [n for n in names if isinstance(features[n], nn.Conv2d)]
        self.classifier = copy.deepcopy(model.classifier)
        self.grouped_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}

        self.register_state_dict_post_hook(_state_dict_to_grouped)
        self.register_load_state_dict_pre_hook(_state_dict_from_grouped)
        self.place(self.devices)
        self.load_state_dict(model.state_dict())

    def place(self, devices: Sequence[str | torch.device]) -> "TowerParallelAlexNet":
        """Put (or put back, after ``.cpu()``) each device's layers on its device and the classifier on the head."""
        devices = [torch.device(d) for d in devices][: self.num_towers]
        if len(devices) != len(self.devices):
            raise ValueError(
                f"this model was split over {len(self.devices)} devices; it cannot be placed on "
                f"{len(devices)}. Build it again from a TowerAlexNet (or load the checkpoint)."
            )
        self.devices = devices
        for d, device in enumerate(devices):
            for part in (self.conv1_to_pool2[d], self.conv3_to_pool5[d]):
                if any(p.is_meta for p in part.parameters()):
                    part.to_empty(device=device)
                else:
                    part.to(device)
        self.classifier.to(devices[0])
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One Python call per device per stage; CUDA calls return at once, so the devices compute
        # concurrently, and autograd runs each device's backward on its own thread.
        maps = [part(x.to(device)) for part, device in zip(self.conv1_to_pool2, self.devices)]
        # conv3 reads all towers: each device gathers every device's conv2 maps (in device order).
        maps = [
            part(torch.cat([m.to(device) for m in maps], 1)) for part, device in zip(self.conv3_to_pool5, self.devices)
        ]
        # fc6 reads all towers: the head device gathers the conv5 maps.
        head = self.devices[0]
        return self.classifier(torch.flatten(torch.cat([m.to(head) for m in maps], 1), 1))

    def conv1_kernels(self) -> torch.Tensor:
        """First-layer weights as (towers, kernels per tower, 3, 11, 11), RGB, gathered on the head device (a copy)."""
        conv1 = {k: p for k, p in self.named_parameters() if k.endswith(".conv1.weight")}
        weight = self.grouped_state(conv1)["features.conv1.weight"]
        return weight.view(self.num_towers, -1, *weight.shape[1:])

    # --- the mapping between TowerAlexNet's grouped tensors and the per-device layers -------------

    def _stage(self, name: str) -> str:
        return "conv1_to_pool2" if name in self.conv1_to_pool2[0]._modules else "conv3_to_pool5"

    def grouped_state(self, placed: Mapping[str, torch.Tensor], prefix: str = "") -> "OrderedDict[str, torch.Tensor]":
        """TowerAlexNet's entries (keys and shapes) from tensors keyed like this module's parameters.

        Works for any tensors laid out like the parameters (weights, gradients, momentum buffers);
        layers with missing entries are left out.
        """
        T, head = self.num_towers, self.devices[0]
        back = sorted(range(T), key=self.order.__getitem__)  # back[k]: position of tower k in device order
        grouped = OrderedDict()
        for name in self.conv_names:
            for kind in ("weight", "bias"):
                keys = [f"{prefix}{self._stage(name)}.{d}.{name}.{kind}" for d in range(len(self.devices))]
                if all(key in placed for key in keys):
                    t = tower_blocks(torch.cat([placed[key].detach().to(head) for key in keys]), 0, back, T)
                    if name in CROSSINGS and kind == "weight":
                        t = tower_blocks(t, 1, back, T)
                    grouped[f"{prefix}features.{name}.{kind}"] = t
        for key, t in placed.items():
            if key.startswith(prefix + "classifier."):
                t = t.detach()
                grouped[key] = tower_blocks(t, 1, back, T) if key == f"{prefix}classifier.fc6.weight" else t
        return grouped

    def placed_state(self, grouped: Mapping[str, torch.Tensor], prefix: str = "") -> "OrderedDict[str, torch.Tensor]":
        """The inverse of :meth:`grouped_state`: per-device slices keyed like this module's parameters."""
        T = self.num_towers
        placed = OrderedDict()
        for name in self.conv_names:
            for kind in ("weight", "bias"):
                key = f"{prefix}features.{name}.{kind}"
                if key not in grouped:
                    continue
                t = grouped[key]
                if name in CROSSINGS and kind == "weight":
                    t = tower_blocks(t, 1, self.order, T)
                t = tower_blocks(t, 0, self.order, T)
                rows = [len(towers) * (t.shape[0] // T) for towers in self.towers_on_device]
                for d, piece in enumerate(t.split(rows)):
                    placed[f"{prefix}{self._stage(name)}.{d}.{name}.{kind}"] = piece
        for key, t in grouped.items():
            if key.startswith(prefix + "classifier."):
                placed[key] = tower_blocks(t, 1, self.order, T) if key == f"{prefix}classifier.fc6.weight" else t
        return placed


def _state_dict_to_grouped(module: TowerParallelAlexNet, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """state_dict post-hook: replace the per-device entries by TowerAlexNet's grouped ones, in place."""
    mine = OrderedDict((k, state_dict.pop(k)) for k in [k for k in state_dict if k.startswith(prefix)])
    state_dict.update(module.grouped_state(mine, prefix))


def _state_dict_from_grouped(
    module: TowerParallelAlexNet,
    state_dict: dict,
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    """load_state_dict pre-hook: replace TowerAlexNet's grouped entries by per-device slices, in place.

    Entries of the wrong shape stay as they are (load_state_dict then reports them), with a message
    that says which setting probably differs.
    """
    grouped = OrderedDict()
    for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix) :] in module.grouped_shapes]:
        expected, got = module.grouped_shapes[key[len(prefix) :]], tuple(state_dict[key].shape)
        if got == expected:
            grouped[key] = state_dict.pop(key)
        else:
            error_msgs.append(
                f"size mismatch for {key}: the checkpoint has {got}, this TowerAlexNet {expected} "
                f"(another num_towers, width_policy, width_multiplier or image_size?)"
            )
    state_dict.update(module.placed_state(grouped, prefix))


class TowerParallelStrategy(SingleDeviceStrategy):
    """One process, towers on several devices: the paper's model parallelism (see the module docstring).

    Args:
        devices: the devices, e.g. ``["cuda:0", "cuda:1"]``. Leave out to take them from the
            Trainer's ``accelerator`` and ``devices`` (``--trainer.devices 2``); the first is the
            head device that holds the batch, the fully-connected layers and the loss.

    The whole batch goes through every tower: ``data.batch_size`` is the global batch here
    (under DDP it is per device).
    """

    strategy_name = "tower_parallel"

    def __init__(self, devices: list[str] | None = None, accelerator=None, checkpoint_io=None, precision_plugin=None):
        super().__init__(
            device="cpu", accelerator=accelerator, checkpoint_io=checkpoint_io, precision_plugin=precision_plugin
        )
        # Lightning's accelerator connector fills `parallel_devices` from Trainer(devices=...) when empty.
        self.parallel_devices = [torch.device(d) for d in devices] if devices else None

    @property
    def root_device(self) -> torch.device:
        return self.parallel_devices[0]

    def model_to_device(self) -> None:
        module = self.lightning_module
        module.to(self.root_device)  # metrics, buffers and anything else besides the towers
        found = False
        for parent in list(module.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, TowerAlexNet):
                    setattr(parent, name, TowerParallelAlexNet(child, self.parallel_devices))
                    found = True
                elif isinstance(child, TowerParallelAlexNet):
                    child.place(self.parallel_devices)  # after a teardown moved it to the CPU
                    found = True
        if not found:
            raise ValueError(
                f"TowerParallelStrategy places the towers of a TowerAlexNet; {type(module).__name__} holds none"
            )

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        # torch's Optimizer.load_state_dict puts each state tensor on its parameter's device; the
        # base strategy would then move all of it to the head device.
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            try:
                optimizer.load_state_dict(state)
            except ValueError as err:
                raise ValueError(
                    "this checkpoint's optimizer state was saved with another parameter layout (single-device, "
                    "DDP, or tower-parallel over another number of devices), so the run cannot be resumed in "
                    "this mode. Start a new run from its weights instead: "
                    f"TowerClassifier.load_from_checkpoint(path). ({err})"
                ) from err


# `--trainer.strategy tower_parallel`, and the class paths as plain strings: LightningCLI passes a
# string through to the Trainer, which lowercases it and looks it up in this registry.
for _name in ("tower_parallel", "towers.TowerParallelStrategy", "towers.parallel.TowerParallelStrategy"):
    StrategyRegistry.register(
        _name.lower(), TowerParallelStrategy, description="tower k of a TowerAlexNet on device k", override=True
    )
