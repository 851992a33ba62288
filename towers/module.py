"""The LightningModule: TowerAlexNet trained as in §5 of the paper."""

import os
from typing import Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from towers.data import colour_inputs
from towers.model import TowerAlexNet
from towers.records import TEST_ACC, VAL_ACC, accuracy_key

# Top-k accuracies logged for validation and test besides top-1 (the paper's Table 1 gives top-1 and top-5),
# each only where the model has more than k classes (top-5 of 5 classes would always be 1).
EVAL_TOP_K = (5,)


class TowerClassifier(L.LightningModule):
    """Cross-entropy training of a :class:`TowerAlexNet` with the paper's SGD.

    Args:
        num_towers, num_classes: passed to :class:`TowerAlexNet`, like every
            other architecture argument (``model_kwargs``: ``width_policy``,
            ``width_multiplier``, the LRN and initialisation switches, ...).
        lr: initial learning rate (§5: 0.01).
        momentum, weight_decay: §5: 0.9 and 0.0005.
        bias_weight_decay: the paper's update rule decays every weight; the 2012
            code and Caffe decay only the weights, not the biases (the default).
        lr_schedule: ``"plateau"`` divides the rate by 10 when validation accuracy
            stops improving for ``lr_patience`` epochs, at most ``max_lr_drops``
            times (§5); ``"step"`` divides it by 10 at the epochs in
            ``lr_milestones`` (the 2012 run: 25 and 51); ``"constant"`` never does.
        channels_last: keep activations in NHWC memory format. ``None`` (the default) chooses by
            device: on the CPU, where oneDNN's convolutions and the pools run faster in it
            (BENCHMARKS.md), but not on CUDA, where cuDNN's grouped NHWC convolutions are a known
            slow path. Only the speed differs: the weights agree to float rounding (summation order).
        compile: run the network through ``torch.compile`` (``nn.Module.compile``: the state dict and
            checkpoints keep their keys). ``None`` (the default) chooses by device: on CUDA, where a
            step is short and Python's overhead per layer counts, not on the CPU, where compiling takes
            about a minute and the step is no faster (BENCHMARKS.md). Under compilation the LRN runs as
            tensor operations (the GPU's implementation; :mod:`towers.lrn`). Not applied under the
            tower-parallel strategy, which rebuilds the network per device.

    Accuracies are the fraction of images whose label is the top prediction (``val/acc``, ``test/acc``)
    or among the five top predictions (``val/acc_top5``, ``test/acc_top5``, with five or more classes):
    the paper's top-1 and top-5, counted over images (torchmetrics' ``average="micro"``), not averaged
    over classes. A test batch of ten patches per image (the data's ``ten_patch_test``) is scored on
    the mean of the ten softmax outputs, as §4.1 does.
        color_blind_towers (in ``model_kwargs``): the positive control (:class:`towers.model.GreyKernels`).
            At ``setup`` the blind kernels are made grey in raw-RGB units of the data module's inputs
            (its ``input_channel_std`` when it divides by a std, :class:`towers.data.ColourInputs`), the
            units the callback scores in.
    """

    def __init__(
        self,
        num_towers: int = 2,
        num_classes: int = 2,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        bias_weight_decay: bool = False,
        lr_schedule: Literal["plateau", "step", "constant"] = "plateau",
        lr_patience: int = 5,
        max_lr_drops: int = 3,
        lr_milestones: tuple[int, ...] = (25, 51),
        channels_last: bool | None = None,
        compile: bool | None = None,
        **model_kwargs,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = TowerAlexNet(num_towers=num_towers, num_classes=num_classes, **model_kwargs)
        self.train_loss = MeanMetric()  # the epoch's mean loss, reduced over DDP ranks when computed
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = self._accuracies(num_classes)
        self.test_acc = self._accuracies(num_classes)
        self.test_patches: int | None = None  # patches per image of the latest test: 1 (centre crop) or 10

    @staticmethod
    def _accuracies(num_classes: int) -> nn.ModuleDict:
        """Top-1 and the top-k of EVAL_TOP_K that mean something for this many classes, by their k."""
        ks = [1, *(k for k in EVAL_TOP_K if num_classes > k)]
        return nn.ModuleDict({str(k): MulticlassAccuracy(num_classes, top_k=k, average="micro") for k in ks})

    def setup(self, stage: str) -> None:
        if getattr(
            self.model, "color_blind_towers", None
        ):  # (after a tower-parallel fit, self.model is the placed one)
            from towers.parallel import TowerParallelStrategy

            if isinstance(self.trainer.strategy, TowerParallelStrategy):
                raise ValueError(
                    "model.color_blind_towers is not supported with the tower_parallel strategy "
                    "(it places plain conv1 slices per device); use one device or DDP"
                )
            # Before any measurement or step: grey in the units the callback scores in (raw RGB). Only when
            # fitting: validating or testing keeps the axis the weights were trained with (a resumed fit
            # gets it back from the checkpoint, which is restored after this hook).
            if stage == "fit":
                input_channel_std, _ = colour_inputs(getattr(self.trainer, "datamodule", None))
                self.model.set_grey_axis(input_channel_std)
        # Before the strategy moves the model: converting the conv weights is enough, the
        # convolutions then return NHWC and every layer after them keeps it.
        channels_last = self.hparams.channels_last
        if channels_last is None:
            channels_last = self.trainer.strategy.root_device.type == "cpu"
        self.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        compile_ = self.hparams.get("compile")
        if compile_ is None:
            compile_ = self.trainer.strategy.root_device.type == "cuda"
        if compile_ and getattr(self.model, "_compiled_call_impl", None) is None:
            from towers.parallel import TowerParallelStrategy

            if isinstance(self.trainer.strategy, TowerParallelStrategy):
                rank_zero_warn(
                    "model.compile is not applied under the tower_parallel strategy (it rebuilds the network)"
                )
            else:
                self.model.compile()  # compiled at its first call; the state dict keeps its keys

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def conv1_kernels(self) -> torch.Tensor:
        return self.model.conv1_kernels()

    def training_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.train_acc(logits, labels)
        self.train_loss(loss.detach())
        # Tensors and metrics are logged without .item(): Lightning reads them at the logging interval,
        # so there is no host-device sync per step. The step value is this rank's; the epoch value
        # (`train/loss`) is a torchmetrics mean, synced across ranks once, at the end of the epoch.
        self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)  # read at the bar's refresh
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True)
        self.log(accuracy_key("train"), self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch, stage: str, accuracies: nn.ModuleDict) -> int:
        """Loss and accuracies of one evaluation batch; returns the patches per image (1 or 10)."""
        images, labels = batch
        if images.dim() == 5:  # ten-patch test: (batch, patches, 3, h, w), softmax averaged over patches
            b, p = images.shape[:2]
            probs = self(images.flatten(0, 1)).softmax(-1).view(b, p, -1).mean(1)
            logits = probs.clamp_min(1e-12).log()  # log of the averaged softmax: its own softmax again
        else:
            p, logits = 1, self(images)
        loss = F.cross_entropy(logits, labels)
        self.log(f"{stage}/loss", loss, sync_dist=True)
        for k, accuracy in accuracies.items():
            accuracy(logits, labels)
            self.log(accuracy_key(stage, int(k)), accuracy, prog_bar=k == "1")
        return p

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self.test_patches = self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch, batch_idx):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).softmax(-1)

    def on_train_epoch_start(self):
        # Dropout draws from torch's global RNG. Reseeding it from (run seed, epoch) at the start of
        # every epoch makes the masks a function of the epoch alone, so a run resumed from an
        # end-of-epoch checkpoint draws exactly what an uninterrupted run would have, whatever else
        # (validation loaders, sanity checks, callbacks) took from the global RNG in between.
        run_seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        torch.manual_seed(int(np.random.SeedSequence([run_seed, self.current_epoch]).generate_state(1)[0]))

    def configure_optimizers(self):
        hp = self.hparams

        def is_decayed(name: str) -> bool:  # a parametrised weight is stored as `...weight.original`
            return name.removesuffix(".original").endswith("weight") or hp.bias_weight_decay

        decayed = [p for n, p in self.model.named_parameters() if is_decayed(n)]
        undecayed = [p for n, p in self.model.named_parameters() if not is_decayed(n)]
        # torch's fused SGD: one pass per parameter instead of three (weight decay, momentum, update),
        # the same updates to float rounding; on the CPU that saves a seventh of a full-size step.
        # Lightning cannot clip the gradients of a fused optimizer under mixed precision, so not then.
        clipping = self._trainer is not None and bool(self.trainer.gradient_clip_val)
        fused = not clipping and all(p.device.type in ("cpu", "cuda") for p in self.model.parameters())
        optimizer = torch.optim.SGD(
            [{"params": decayed, "weight_decay": hp.weight_decay}, {"params": undecayed, "weight_decay": 0.0}],
            lr=hp.lr,
            momentum=hp.momentum,
            fused=fused,
        )
        if hp.lr_schedule == "constant":
            return optimizer
        if hp.lr_schedule == "step":
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(hp.lr_milestones), gamma=0.1)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
        # min_lr stops the plateau schedule after max_lr_drops divisions by 10 (the paper: three);
        # the small margin keeps floating-point rounding from allowing a fourth.
        min_lr = hp.lr * 0.1**hp.max_lr_drops * (1 - 1e-6)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=0.1, patience=hp.lr_patience, min_lr=min_lr
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": VAL_ACC, "interval": "epoch", "strict": True},
        }


def accuracy_line(trainer) -> str:
    """The end-of-fit block's accuracy line: top-1 (and top-5 where logged) on the test split, and how
    the images were presented (the centre crop, or the paper's average over ten patches)."""
    metrics = trainer.callback_metrics
    if TEST_ACC not in metrics:
        return "test accuracy: not tested"
    line = f"test accuracy: {float(metrics[TEST_ACC]):.4f}"
    top_k = [(k, metrics[accuracy_key("test", k)]) for k in EVAL_TOP_K if accuracy_key("test", k) in metrics]
    if top_k:
        line += " top-1, " + ", ".join(f"{float(value):.4f} top-{k}" for k, value in top_k)
    patches = getattr(trainer.lightning_module, "test_patches", None)
    return line + {1: " (centre crop)", 10: " (average of ten patches, §4.1)"}.get(patches, "")
