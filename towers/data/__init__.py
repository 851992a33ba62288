"""Labelled images with the paper's preprocessing, and what the model and the callback may ask of a data module.

    sources/     where the images come from: Cats-vs-Dogs layouts, ImageNet, class folders (files,
                 labels, class names, any official split; subsets of classes and images)
    files.py     decoding one image whatever its pixel format, the two datasets
    store.py     checking every file once, the pre-resized store, the splits, the training statistics
    download.py  downloading and unpacking archives
    demo.py      the synthetic demo set
    augment.py   the paper's batch augmentation: pure tensor functions and ``Preprocessing``, the one
                 nn.Module with the training statistics as buffers (no Lightning)
    module.py    ``ImageDataModule`` (alias ``CatsDogsDataModule``), the LightningDataModule over them

The names below are exported lazily (PEP 562), so ``towers.data.augment`` or :func:`colour_inputs`
import without Lightning, PIL or the rest of the package.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

_EXPORTS = {
    "ImageDataModule": "towers.data.module",
    "CatsDogsDataModule": "towers.data.module",
    "Preprocessing": "towers.data.augment",
    "Subset": "towers.data.sources",
    "CLASSES": "towers.data.files",
    "BadImage": "towers.data.files",
    "ImageFiles": "towers.data.files",
    "ImageStore": "towers.data.files",
    "find_images": "towers.data.files",
    "link_problem": "towers.data.files",
    "load_image": "towers.data.files",
    "MICROSOFT_SHA256": "towers.data.download",
    "MICROSOFT_URL": "towers.data.download",
    "MICROSOFT_ZIP": "towers.data.download",
    "download_microsoft": "towers.data.download",
    "download_oxford_pet": "towers.data.download",
    "fetch": "towers.data.download",
    "safe_extract": "towers.data.download",
    "crop": "towers.data.augment",
    "ten_patches": "towers.data.augment",
    "make_demo_dataset": "towers.data.demo",
}
__all__ = sorted([*_EXPORTS, "ColourInputs", "colour_inputs"])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'towers.data' has no attribute {name!r}")


@runtime_checkable
class ColourInputs(Protocol):
    """What the model and the kernel-bisection callback need to know about the colours of the inputs.

    ``ImageDataModule`` implements it (both set by its ``setup`` from the training pixels).

    Attributes:
        input_channel_std: (3,) per-channel std of the raw RGB pixels that the inputs were divided by,
            or None when the inputs are raw RGB minus the mean. The callback scores kernels in raw-RGB
            units (it divides channel c of the weights by it); ``TowerClassifier`` sets the grey axis of
            its colour-blind towers to s/|s| from it.
        rgb_eigenvectors: (3, 3) principal components of the training pixels' RGB covariance, column k
            component k, largest first; the callback's ``axis="pca"`` scores against column 0. None:
            not known.
    """

    input_channel_std: torch.Tensor | None
    rgb_eigenvectors: torch.Tensor | None


def colour_inputs(datamodule: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(input_channel_std, rgb_eigenvectors)`` of ``datamodule`` (see :class:`ColourInputs`).

    The one place the model and the callback read them. A data module may declare only part of the
    interface (one that divides by a std but knows no colour axis); what it does not declare is None,
    as it is for no data module at all (a fit on bare loaders): raw-RGB inputs, no known axis.
    """
    return getattr(datamodule, "input_channel_std", None), getattr(datamodule, "rgb_eigenvectors", None)
