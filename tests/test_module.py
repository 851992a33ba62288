"""TowerClassifier at scale: top-1 and top-5 accuracy, the ten-patch test, the training step under torch.compile."""

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from towers.module import TowerClassifier, accuracy_line

TINY = dict(width_multiplier=0.125, image_size=67, init_std=0.03, lr_schedule="constant")


def quiet_trainer() -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


class Logits(nn.Module):
    """Stands in for the network: an image's logits are its per-channel means (channel c -> class c)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).mean(-1) if x.dim() == 4 else x


# --- top-1 and top-5 ---------------------------------------------------------------------------------

# Six classes. Each row's label and where it ranks among the logits (1 = the largest):
#   [6,5,4,3,2,1] label 0: rank 1      [6,5,4,3,2,1] label 4: rank 5      [6,5,4,3,2,1] label 5: rank 6
#   [0,0,0,9,0,1] label 3: rank 1      [1,2,3,4,5,6] label 1: rank 5      [1,2,3,4,5,6] label 0: rank 6
# top-1: rows 1 and 4, 2 of 6; top-5: rows 1, 2, 4, 5, 4 of 6. Averaged over classes instead (macro),
# top-1 would be the mean recall of classes 0, 1, 3, 4, 5 = (1/2 + 0 + 1 + 0 + 0) / 5 = 0.3.
LOGITS = torch.tensor(
    [
        [6, 5, 4, 3, 2, 1],
        [6, 5, 4, 3, 2, 1],
        [6, 5, 4, 3, 2, 1],
        [0, 0, 0, 9, 0, 1],
        [1, 2, 3, 4, 5, 6],
        [1, 2, 3, 4, 5, 6],
    ],
    dtype=torch.float32,
)
LABELS = torch.tensor([0, 4, 5, 3, 1, 0])


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_top1_and_top5_count_images_over_all_batches(stage):
    module = TowerClassifier(num_classes=6, **TINY)
    module.model = Logits()
    loader = DataLoader(TensorDataset(LOGITS, LABELS), batch_size=4)  # two batches: 4 + 2 images
    [metrics] = getattr(quiet_trainer(), stage)(module, dataloaders=loader, verbose=False)
    prefix = "val" if stage == "validate" else "test"
    assert metrics[f"{prefix}/acc"] == pytest.approx(2 / 6)
    assert metrics[f"{prefix}/acc_top5"] == pytest.approx(4 / 6)
    assert metrics[f"{prefix}/loss"] == pytest.approx(F.cross_entropy(LOGITS, LABELS).item(), rel=1e-5)


@pytest.mark.parametrize("num_classes, keys", [(2, ["val/acc"]), (5, ["val/acc"]), (6, ["val/acc", "val/acc_top5"])])
def test_top5_only_where_it_can_miss(num_classes, keys):
    # with five classes or fewer every label is among the top five: top-5 accuracy would be 1 by construction
    module = TowerClassifier(num_classes=num_classes, **TINY)
    module.model = Logits()
    data = TensorDataset(torch.randn(4, num_classes), torch.arange(4) % num_classes)
    [metrics] = quiet_trainer().validate(module, dataloaders=DataLoader(data, batch_size=4), verbose=False)
    assert sorted(k for k in metrics if "/acc" in k) == keys


# --- ten patches -------------------------------------------------------------------------------------


def test_ten_patch_test_averages_the_softmax_of_the_patches():
    # One image, three classes, ten patches: six with logits (3, 0, 0), four with (0, 6, 0); label 0.
    # Mean softmax: class 0 gets (6 e^3/(e^3+2) + 4/(e^6+2)) / 10 = 0.547, class 1 (6/(e^3+2) + 4 e^6/(e^6+2)) / 10
    # = 0.425, so the image is right. Averaging the logits instead, (1.8, 2.4, 0), would call it class 1:
    # the test tells the paper's average of predictions from an average of logits.
    patches = torch.zeros(1, 10, 3, 2, 2)
    patches[0, :6, 0] = 3.0
    patches[0, 6:, 1] = 6.0
    module = TowerClassifier(num_classes=3, **TINY)
    module.model = Logits()
    trainer = quiet_trainer()
    [metrics] = trainer.test(module, dataloaders=DataLoader(TensorDataset(patches, torch.tensor([0]))), verbose=False)
    e3, e6 = math.exp(3), math.exp(6)
    p0 = (6 * e3 / (e3 + 2) + 4 / (e6 + 2)) / 10
    assert p0 == pytest.approx(0.5466, abs=1e-4)
    assert metrics["test/loss"] == pytest.approx(-math.log(p0), rel=1e-5)
    assert metrics["test/acc"] == 1.0
    assert module.test_patches == 10
    assert accuracy_line(trainer) == "test accuracy: 1.0000 (average of ten patches, §4.1)"
    # the same patches as ten separate test images: the centre-crop path scores each on its own
    [single] = trainer.test(
        module, dataloaders=DataLoader(TensorDataset(patches[0], torch.zeros(10, dtype=torch.long))), verbose=False
    )
    assert single["test/acc"] == pytest.approx(0.6) and module.test_patches == 1
    assert accuracy_line(trainer).endswith("(centre crop)")


def test_accuracy_line_shows_top5_with_many_classes():
    module = TowerClassifier(num_classes=6, **TINY)
    module.model = Logits()
    trainer = quiet_trainer()
    trainer.test(module, dataloaders=DataLoader(TensorDataset(LOGITS, LABELS), batch_size=6), verbose=False)
    assert accuracy_line(trainer) == "test accuracy: 0.3333 top-1, 0.6667 top-5 (centre crop)"


# --- torch.compile -----------------------------------------------------------------------------------


def attached(module: TowerClassifier) -> TowerClassifier:
    """``module`` after its ``setup("fit")`` under a CPU trainer, as a fit would leave it."""
    module.trainer = quiet_trainer()
    module.setup("fit")
    return module


def test_compile_is_off_by_default_on_the_cpu():
    module = attached(TowerClassifier(**TINY))
    assert module.model._compiled_call_impl is None


@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",  # dynamo's graph and AOT autograd's backward, run by eager kernels: seconds
        pytest.param("inductor", marks=pytest.mark.compile),  # what model.compile runs: C++ kernels, ~1 min cold
    ],
)
def test_the_compiled_training_step_matches_eager_on_the_cpu(backend):
    """Loss and every gradient of one training step, compiled (the tensor-ops LRN the GPU uses) against
    eager (the CPU's Numba LRN), channels_last as on the CPU, dropout drawn from the same seed."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    eager = TowerClassifier(num_classes=5, compile=False, **TINY)
    compiled = copy.deepcopy(eager)
    compiled.hparams.compile = backend == "inductor"  # the switch; inductor is torch.compile's default
    eager, compiled = attached(eager), attached(compiled)
    if backend != "inductor":
        compiled.model.compile(backend=backend)
    assert compiled.model._compiled_call_impl is not None and eager.model._compiled_call_impl is None
    x = (torch.randn(4, 3, 67, 67, generator=torch.Generator().manual_seed(1)) * 50).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.tensor([0, 1, 2, 4])
    losses = {}
    torch._dynamo.reset()
    counters.clear()
    for name, module in (("eager", eager), ("compiled", compiled)):
        torch.manual_seed(2)  # the same dropout masks: inductor draws with torch's generator (fallback_random)
        with torch._inductor.config.patch(fallback_random=True):
            losses[name] = F.cross_entropy(module(x), y)
        losses[name].backward()
    assert counters["stats"]["unique_graphs"] == 1  # the network was compiled, as one graph:
    assert not counters["graph_break"], dict(counters["graph_break"])  # the LRN traced, not a call into Numba
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-5, atol=0)
    for (name, p), (_, q) in zip(eager.model.named_parameters(), compiled.model.named_parameters()):
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max().item(), msg=name)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints keep their keys
