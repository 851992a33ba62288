"""Known answers: the colour-blind positive control (towers.model.GreyKernels) found by the real callback,
the demo generator's two cues, and the figures' labels and type sizes."""

import json

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from towers import KernelBisectionCallback, TowerClassifier
from towers.color import Bisection, color_specificity, tower_labels
from towers.data.demo import demo_image
from towers.figures import SCORE_PLOT_FONT_PT, kernel_grid, label_width, score_figure
from towers.model import TowerAlexNet
from towers.runs import run_dir
from towers.verdict import verdict

SIZE = 67  # the smallest input the network takes comfortably
STD = torch.tensor([30.0, 60.0, 90.0])  # a data module that divides by very unequal channel stds


def tiny(**kwargs) -> TowerClassifier:
    # 6 conv1 kernels per tower; a large rate so the kernels move in a few steps
    return TowerClassifier(
        num_towers=2, width_multiplier=0.125, image_size=SIZE, lr=0.05, lr_schedule="constant", **kwargs
    )


class StdData(L.LightningDataModule):
    """Random images; announces an input channel std as CatsDogsDataModule(divide_std=True) does."""

    input_channel_std = STD

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        return DataLoader(
            TensorDataset(torch.randn(32, 3, SIZE, SIZE, generator=g), torch.randint(0, 2, (32,), generator=g)),
            batch_size=8,
        )


def raw_rgb_spread(kernels, std=None) -> torch.Tensor:
    """Per kernel: how far its raw-RGB channels are from equal, relative to its size (0: exactly grey)."""
    w = kernels.flatten(0, 1).double()
    if std is not None:
        w = w / std.double().view(1, 3, 1, 1)
    return (w - w.mean(1, keepdim=True)).flatten(1).norm(dim=1) / w.flatten(1).norm(dim=1)


def test_blind_kernels_stay_grey_under_the_fused_sgd_the_module_configures():
    module = tiny(color_blind_towers=[1], weight_decay=5e-3)  # a large decay, so its effect shows too
    module.model.to(memory_format=torch.channels_last)  # as setup() does on the CPU
    optimizer = module.configure_optimizers()
    assert optimizer.defaults["fused"] and optimizer.defaults["momentum"] == 0.9
    stored = module.model.features.conv1.parametrizations.weight.original
    decayed = optimizer.param_groups[0]["params"]
    assert any(p is stored for p in decayed) and optimizer.param_groups[0]["weight_decay"] == 5e-3
    before = module.conv1_kernels().detach().clone()
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        optimizer.zero_grad()
        x, y = torch.randn(8, 3, SIZE, SIZE, generator=g), torch.randint(0, 2, (8,), generator=g)
        F.cross_entropy(module(x), y).backward()
        optimizer.step()
    after = module.conv1_kernels().detach()
    assert module.model.features.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert raw_rgb_spread(after[:1]).max() < 1e-6  # tower 1: grey to float rounding
    assert color_specificity(after[0]).max() < 1e-10
    assert raw_rgb_spread(after[1:]).min() > 0.3  # tower 2: as coloured as random kernels
    assert (after - before)[0].norm() > 1e-3 * before[0].norm()  # the blind tower did learn, in grey
    stored_chroma = stored[:6] - stored[:6].mean(1, keepdim=True)  # the stored tensor is not grey: the
    assert stored_chroma.norm() > 0.1 * stored[:6].norm()  # projection, not the optimiser, keeps it so


def test_grey_means_grey_in_raw_rgb_when_inputs_are_divided_by_a_std():
    model = TowerAlexNet(2, width_multiplier=0.125, image_size=SIZE, color_blind_towers=[2])
    model.set_grey_axis(STD)
    kernels = model.conv1_kernels().detach()
    assert raw_rgb_spread(kernels[1:], STD).max() < 1e-6 and raw_rgb_spread(kernels[1:]).min() > 0.1
    assert color_specificity(kernels[1], STD).max() < 1e-10
    with pytest.raises(ValueError, match="color_blind_towers \\[3\\]"):
        TowerAlexNet(2, width_multiplier=0.125, image_size=SIZE, color_blind_towers=[3])


def test_state_dicts_keep_the_plain_conv1_key_both_ways():
    blind = TowerAlexNet(2, width_multiplier=0.125, image_size=SIZE, color_blind_towers=[1])
    state = blind.state_dict()
    assert "features.conv1.weight" in state and not any("original" in k for k in state)
    torch.testing.assert_close(state["features.conv1.weight"], blind.features.conv1.weight.detach())
    plain = TowerAlexNet(2, width_multiplier=0.125, image_size=SIZE)
    plain.load_state_dict({k: v for k, v in state.items() if "parametrizations" not in k})
    torch.testing.assert_close(plain.conv1_kernels(), blind.conv1_kernels(), rtol=0, atol=0)
    # a checkpoint trained without the switch loads into a colour-blind model (e.g. to fine-tune it)
    other = TowerAlexNet(2, width_multiplier=0.125, image_size=SIZE, color_blind_towers=[1])
    other.load_state_dict(TowerAlexNet(2, width_multiplier=0.125, image_size=SIZE).state_dict())
    assert color_specificity(other.conv1_kernels()[0]).max() < 1e-10


@pytest.fixture(scope="module")
def blind_fit(tmp_path_factory):
    """Two towers, tower 1 colour-blind, inputs divided by STD: 4 steps with the real callback and a checkpoint.
    Initialised like the demo (configs/demo.yaml: std 0.05, positive bias 0.1) but with conv1 25 times
    smaller (0.0002 rather than 0.005), so the conv1
    kernels move further than their initial size in 4 steps (as the demo's do in 90) and the verdict judges
    learned kernels, not their initialisation."""
    root = tmp_path_factory.mktemp("blind")
    L.seed_everything(0)
    module = tiny(color_blind_towers=[1], init_std=0.05, init_std_overrides={"conv1": 0.0002}, positive_bias=0.1)
    callback = KernelBisectionCallback(every_n_epochs=1, permutations=999, bootstrap=200)
    trainer = L.Trainer(
        max_steps=4,
        default_root_dir=root,
        logger=False,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, datamodule=StdData())
    trainer.save_checkpoint(root / "blind.ckpt")
    return module, run_dir(trainer), root / "blind.ckpt"


def test_the_real_callback_calls_the_positive_control_specialised(blind_fit):
    _, folder, _ = blind_fit
    saved = json.loads((folder / "bisection.json").read_text())
    init, last = saved["init"], saved["last"]
    # untrained: tower 1 grey (score 0), tower 2 random (score ~2/3), but nothing is learned yet, so every
    # kernel is unstructured and counts for neither side (issue 22: noise never reads as colour)
    assert init["verdict"] == "not specialised" and init["unstructured_count"] == [6, 6]
    assert init["structure_method"] == "movement" and init["specific_tower"] is None
    assert init["kernel_change"] == [0.0, 0.0]
    # trained: tower 1 learned in grey, tower 2 in colour
    assert last["channel_std"] == pytest.approx(STD.tolist()) and last["structure_method"] == "movement"
    assert all(c > 1 for c in last["kernel_change"]) and min(last["movement"]) > 1
    assert last["verdict"] == "specialised", last["reason"]
    assert (last["agnostic_tower"], last["specific_tower"]) == (1, 2)
    assert max(last["score"][:6]) < 1e-9 and min(last["score"][6:]) > 1 / 3
    assert last["colour_fraction"] == [0.0, 1.0] and last["margin"] >= 1


def test_the_positive_control_survives_a_lightning_checkpoint(blind_fit):
    module, _, path = blind_fit
    checkpoint = torch.load(path, weights_only=False)
    assert "model.features.conv1.weight" in checkpoint["state_dict"]  # what analysis/kernels.py reads
    loaded = TowerClassifier.load_from_checkpoint(path)
    assert loaded.model.color_blind_towers == [1]
    torch.testing.assert_close(loaded.conv1_kernels(), module.conv1_kernels().detach(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(loaded.model.features.conv1.parametrizations.weight[0].axis, STD / STD.norm())
    assert color_specificity(loaded.conv1_kernels()[0], STD).max() < 1e-10
    # and a run resumes from it (optimizer state of the stored tensor included), its blind tower still grey
    resumed = tiny(color_blind_towers=[1])
    trainer = L.Trainer(
        max_steps=6,
        default_root_dir=path.parent / "resumed",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(resumed, datamodule=StdData(), ckpt_path=path)
    assert trainer.global_step == 6
    assert color_specificity(resumed.conv1_kernels()[0], STD).max() < 1e-10
    assert not torch.allclose(resumed.conv1_kernels(), loaded.conv1_kernels())


def test_tower_parallel_refuses_the_positive_control_with_one_line(tmp_path):
    from towers.parallel import TowerParallelStrategy

    trainer = L.Trainer(
        strategy=TowerParallelStrategy(),
        accelerator="cpu",
        devices=2,
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(ValueError, match="color_blind_towers is not supported with the tower_parallel"):
        trainer.fit(tiny(color_blind_towers=[1]), datamodule=StdData())


# --- the demo generator --------------------------------------------------------------------------


def cue_features(n: int, seed: int):
    """Per image: mean RGB (the colour cue) and the luminance structure tensor (the texture cue:
    mean gx², gy², gx·gy, i.e. oriented gradient energy), with the label (cat 0, dog 1)."""
    rng = np.random.default_rng(seed)
    colour, texture, label = [], [], []
    for i in range(n):
        image = demo_image(rng, ("cat", "dog")[i % 2]).astype(np.float64)
        gy, gx = np.gradient(image.mean(2))
        colour.append(image.reshape(-1, 3).mean(0))
        texture.append([np.mean(gx * gx), np.mean(gy * gy), np.mean(gx * gy)])
        label.append(i % 2)
    return torch.tensor(np.array(colour)), torch.tensor(np.array(texture)), torch.tensor(label)


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, train: int) -> float:
    """Held-out accuracy of a logistic-regression probe (L-BFGS, light L2) trained on the first ``train`` rows."""
    x = (x - x[:train].mean(0)) / x[:train].std(0)
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    w = torch.zeros(x.shape[1], dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x[:train] @ w, y[:train].to(x.dtype)) + 1e-4 * w.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return ((x[train:] @ w > 0).long() == y[train:]).double().mean().item()


def test_the_demo_needs_both_cues():
    colour, texture, label = cue_features(600, seed=0)
    both = probe_accuracy(torch.cat([colour, texture], 1), label, 300)
    colour_only, texture_only = probe_accuracy(colour, label, 300), probe_accuracy(texture, label, 300)
    assert both > 0.95
    # each cue alone solves its own half of the images: about 75%
    assert 0.6 < colour_only < 0.87 and 0.6 < texture_only < 0.87, (colour_only, texture_only)
    assert both - max(colour_only, texture_only) > 0.1
    rng = np.random.default_rng(0)  # the texture is pure luminance: on the grey axis of raw RGB
    flat = demo_image(rng, "cat", "texture").astype(float)
    with pytest.raises(ValueError, match="cue"):
        demo_image(rng, "cat", "smell")
    assert flat.std(axis=(0, 1)).min() > 10  # a visible grating


# --- figures -------------------------------------------------------------------------------------


def test_kernel_grids_name_their_towers_and_frame_weak_kernels():
    kernels = torch.randn(2, 4, 3, 11, 11, generator=torch.Generator().manual_seed(0))
    weak = np.zeros((2, 4), bool)
    weak[1, 2] = True
    plain = kernel_grid(kernels, columns=4, labels=False)
    labelled = kernel_grid(kernels, columns=4, weak=weak)
    margin = label_width(2)
    assert labelled.shape == (plain.shape[0], plain.shape[1] + margin, 3)
    assert (labelled[:, :margin] < 128).any()  # text in the margin
    block = (plain.shape[0] + 12) // 2  # the label of each tower sits beside its own block
    assert (labelled[: block - 12, :margin] < 128).any() and (labelled[block:, :margin] < 128).any()
    framed = labelled[:, margin:]
    changed = (framed != plain).any(-1)
    assert changed.any() and not changed[: (plain.shape[0] - 12) // 2].any()  # framed, in tower 2 only
    assert (plain[changed] == 255).all()  # in the white border: the kernels keep every pixel
    assert (framed[changed] == (220, 30, 30)).all()


def test_score_plot_text_is_legible_and_its_legend_covers_no_data():
    kernels = torch.randn(12, 3, 11, 11, generator=torch.Generator().manual_seed(0))
    scores = color_specificity(kernels)
    towers = tower_labels(2, 6)
    stats = Bisection(**verdict(kernels.view(2, 6, 3, 11, 11), permutations=999, bootstrap=200).statistics())
    fig = score_figure(scores, towers, stats, scores, "end · step 10")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [
        t
        for t in fig.findobj(lambda a: hasattr(a, "get_fontsize") and hasattr(a, "get_text"))
        if t.get_text().strip() and t.get_visible()
    ]
    assert texts and min(t.get_fontsize() for t in texts) >= SCORE_PLOT_FONT_PT >= 8
    ax, legend = fig.axes[0], fig.legends[0]
    legend_box = legend.get_window_extent(renderer)
    assert not legend_box.overlaps(ax.get_window_extent(renderer))
    for label in ax.get_xticklabels():
        assert not legend_box.overlaps(label.get_window_extent(renderer))
    assert legend_box.y0 >= 0 and legend_box.x0 >= 0 and legend_box.x1 <= fig.bbox.width  # inside the picture
