"""The paper's augmentation on batches (§4.1), as pure tensor functions vectorised over the batch:
random crops and horizontal flips, the ten test patches, mean subtraction and PCA colour noise; and
:class:`Preprocessing`, the one ``nn.Module`` that applies them with the training set's statistics
as buffers, on the batch's device.

No Lightning here: :class:`towers.data.module.ImageDataModule` runs :class:`Preprocessing` in
``on_after_batch_transfer``. Every random draw comes from a generator seeded by (seed, epoch, first
image of the batch), never from global random state.
"""

import numpy as np
import torch
from torch import nn


def crop(
    images: torch.Tensor, source: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, size: int
) -> torch.Tensor:
    """``size``-square crops of ``images`` (B, C, R, R): crop m is taken from image ``source[m]`` at
    (``top[m]``, ``left[m]``), mirrored left-right where ``flip[m]``. One gather, no loop.

    With ``source`` None, ``images`` is a single (C, R, R) image (the mean image) cropped M times.
    Returns (M, C, size, size).
    """
    steps = torch.arange(size, device=images.device)
    rows = top[:, None] + steps  # (M, size)
    cols = left[:, None] + torch.where(flip[:, None], size - 1 - steps, steps)  # flips folded into the columns
    channels = torch.arange(images.shape[-3], device=images.device)[None, :, None, None]
    rows, cols = rows[:, None, :, None], cols[:, None, None, :]
    if source is None:  # the mean image: (C, R, R)
        return images[channels, rows, cols]
    return images[source[:, None, None, None], channels, rows, cols]


def ten_patches(resize_size: int, size: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left, flip) of the paper's ten test patches: four corners and the centre, each also mirrored."""
    far, mid = resize_size - size, (resize_size - size) // 2
    top = torch.tensor([0, 0, far, far, mid] * 2, device=device)
    left = torch.tensor([0, far, 0, far, mid] * 2, device=device)
    flip = torch.tensor([False] * 5 + [True] * 5, device=device)
    return top, left, flip


def draw_augmentation(
    indices: torch.Tensor,
    epoch: int,
    seed: int,
    resize_size: int,
    image_size: int,
    pca_noise_std: float,
    random_crop: bool = True,
    random_flip: bool = True,
) -> dict[str, torch.Tensor]:
    """Crop offsets, flips and colour-noise coefficients for one training batch of images ``indices``.

    Drawn from a generator seeded by (seed, epoch, first image index of the batch): within an
    epoch every image is in one batch, so the draws are a function of (seed, epoch, batch).
    All four are always drawn, so switching one off leaves the others unchanged.
    """
    n = len(indices)
    entropy = np.random.SeedSequence([seed, epoch, int(indices[0])]).generate_state(2, np.uint32)
    generator = torch.Generator().manual_seed(int(entropy[0]) << 32 | int(entropy[1]))
    room = resize_size - image_size
    top = torch.randint(0, room + 1, (n,), generator=generator)
    left = torch.randint(0, room + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    alpha = torch.randn(n, 3, generator=generator) * pca_noise_std
    if not random_crop:
        top, left = torch.full((n,), room // 2), torch.full((n,), room // 2)
    if not random_flip:
        flip = torch.zeros(n, dtype=torch.bool)
    return {"top": top, "left": left, "flip": flip, "alpha": alpha}


def augment(
    images: torch.Tensor,
    resize_size: int,
    image_size: int,
    draws: dict | None = None,
    ten_patch: bool = False,
    *,
    mean: str = "pixel",
    mean_image: torch.Tensor | None = None,
    channel_mean: torch.Tensor | None = None,
    pca_noise_std: float = 0.0,
    rgb_eigenvalues: torch.Tensor | None = None,
    rgb_eigenvectors: torch.Tensor | None = None,
    input_channel_std: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 (B, 3, R, R) -> float (B, 3, S, S) crops (R = ``resize_size``, S = ``image_size``) minus
    the mean, plus PCA noise when ``draws``, divided by ``input_channel_std`` when it is given.

    ``draws`` from :func:`draw_augmentation` for training; None for the centre crop, or with
    ``ten_patch`` the ten patches as (B, 10, 3, S, S). ``mean``: ``pixel`` subtracts ``mean_image``
    (3, R, R) cropped like each image, ``channel`` the colour ``channel_mean`` (3,), ``none`` nothing.
    The statistics must be on the device of ``images``.
    """
    device, b = images.device, images.shape[0]
    if draws is not None:
        top, left, flip = draws["top"], draws["left"], draws["flip"]
        source = torch.arange(b, device=device)
    elif ten_patch:
        top, left, flip = (t.repeat(b) for t in ten_patches(resize_size, image_size, device))
        source = torch.arange(b, device=device).repeat_interleave(10)
    else:
        mid = (resize_size - image_size) // 2
        top = left = torch.full((b,), mid, device=device)
        flip = torch.zeros(b, dtype=torch.bool, device=device)
        source = torch.arange(b, device=device)

    x = crop(images, source, top, left, flip, image_size).float()
    if mean == "pixel":
        x -= crop(mean_image, None, top, left, flip, image_size)
    elif mean == "channel":
        x -= channel_mean[:, None, None]
    if draws is not None and pca_noise_std > 0:
        # §4.1: add sum_k alpha_k * sigma_k * p_k to every pixel, sigma_k the std along principal
        # component p_k (cuda-convnet2's reading): the noise covariance is pca_noise_std^2 * covariance.
        noise = (draws["alpha"] * rgb_eigenvalues.sqrt()) @ rgb_eigenvectors.T
        x += noise[:, :, None, None]
    if input_channel_std is not None:
        x /= input_channel_std[:, None, None]
    return x.view(b, 10, *x.shape[1:]) if ten_patch and draws is None else x


STATISTICS = (
    "mean_image",
    "channel_mean",
    "rgb_covariance",
    "rgb_eigenvalues",
    "rgb_eigenvectors",
    "input_channel_std",
)


class Preprocessing(nn.Module):
    """The paper's preprocessing of uint8 (B, 3, R, R) batches, on their device (§2, §4.1): crops
    (random with flips at training time, the centre or the ten patches at test time), mean subtraction,
    PCA colour noise, and optionally division by the per-channel std (not in the paper).

    The training set's statistics are buffers (so ``.to(device)`` moves them once, and they are saved
    with the module): ``mean_image`` (3, R, R), ``channel_mean`` (3,), ``rgb_covariance`` (3, 3),
    ``rgb_eigenvalues`` (3,) largest first and ``rgb_eigenvectors`` (3, 3) column k component k, and
    ``input_channel_std`` (3,) with ``divide_std`` (else None). ``known`` is False until
    :meth:`set_statistics` has filled them. The random draws come from :func:`draw_augmentation`.
    """

    def __init__(
        self,
        resize_size: int = 256,
        image_size: int = 227,
        mean: str = "pixel",
        pca_noise_std: float = 0.1,
        divide_std: bool = False,
    ):
        super().__init__()
        self.resize_size, self.image_size, self.mean, self.pca_noise_std = resize_size, image_size, mean, pca_noise_std
        self.register_buffer("mean_image", torch.zeros(3, resize_size, resize_size))
        self.register_buffer("channel_mean", torch.zeros(3))
        self.register_buffer("rgb_covariance", torch.zeros(3, 3))
        self.register_buffer("rgb_eigenvalues", torch.zeros(3))
        self.register_buffer("rgb_eigenvectors", torch.eye(3))
        self.register_buffer("input_channel_std", torch.ones(3) if divide_std else None)
        self.known = False

    def set_statistics(self, statistics: dict[str, torch.Tensor | None]) -> None:
        """Fill the buffers from :func:`towers.data.store.training_statistics`' dictionary."""
        for name in STATISTICS:
            buffer, value = getattr(self, name), statistics.get(name)
            if buffer is not None and value is not None:
                buffer.copy_(value)
        self.known = True

    def forward(self, images: torch.Tensor, draws: dict | None = None, ten_patch: bool = False) -> torch.Tensor:
        """uint8 (B, 3, R, R) -> float (B, 3, S, S); see :func:`augment` for ``draws`` and ``ten_patch``."""
        if draws is not None:
            draws = {k: v.to(images.device, non_blocking=True) for k, v in draws.items()}
        return augment(
            images,
            self.resize_size,
            self.image_size,
            draws,
            ten_patch,
            mean=self.mean,
            mean_image=self.mean_image,
            channel_mean=self.channel_mean,
            pca_noise_std=self.pca_noise_std,
            rgb_eigenvalues=self.rgb_eigenvalues,
            rgb_eigenvectors=self.rgb_eigenvectors,
            input_channel_std=self.input_channel_std,
        )
