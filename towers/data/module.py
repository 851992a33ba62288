"""Image classification data with the paper's preprocessing (§2, §4.1), as a LightningDataModule:
Cats-vs-Dogs, ImageNet, any class-folder tree or the demo set, over the store backend.

    files  -> found by their source (towers/data/sources/), optionally a subset of classes and images,
              every file checked once (unreadable ones reported and skipped)
           -> the official test split where the dataset has one (ImageNet's validation set), else test
              images drawn at random; the validation images carved from training; by image, from
              ``split_seed``                                             (towers/data/store.py)
           -> each image: shorter side to ``resize_size`` (256), centre crop -> uint8 (3, 256, 256),
              decoded from the file each time (plain path) or read from a pre-resized uint8
              store (fast path); both give the same pixels
    batch  -> moved to the device as uint8, then on the device, vectorised over the batch:
              training: random ``image_size`` (227) crop, horizontal flip, mean subtraction,
              PCA colour noise; evaluation: centre crop, or the paper's ten patches: one nn.Module,
              ``Preprocessing``, with the training statistics as buffers (towers/data/augment.py).

Every random draw (the order of the training images, each crop, flip and colour-noise
coefficient) is a function of ``seed``, the epoch and the images of the batch only, never of
global random state, so a run resumed from an end-of-epoch checkpoint sees exactly the batches
of an uninterrupted run.
"""

import os
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from towers.data.augment import Preprocessing, draw_augmentation
from towers.data.download import obtain
from towers.data.files import ImageFiles
from towers.data.shard_reader import StoreImages, collate_encoded, decode_batch
from towers.data.sources import OFFICIAL_TEST_PREFIX, Subset, find
from towers.data.store import Size, index_images, split_files, training_statistics
from towers.errors import BadOption, MissingData
from towers.files import shown_path


class ImageDataModule(L.LightningDataModule):
    """Labelled images (Cats-vs-Dogs: cat = 0, dog = 1; ImageNet; any class folders) with the paper's
    preprocessing and augmentation.

    Batches are ``(images, labels)``: images float32 (B, 3, S, S) in RGB order and raw 0..255
    pixel units minus the training mean (not divided by a std unless ``divide_std``); labels
    long. With ``ten_patch_test`` test batches are (B, 10, 3, S, S).

    Args:
        root: the dataset folder; the layout is detected (``source: auto``) or given.
        source: ``auto``, ``microsoft`` (PetImages/Cat, PetImages/Dog), ``kaggle`` (train/cat.N.jpg),
            ``folders`` (root/<class>/*), ``oxford_pet`` (Oxford-IIIT Pet through torchvision),
            ``imagenet`` (ILSVRC-2012: its archives, unpacked by ``prepare_data``, or train/<wnid>/ and
            val/), ``demo`` (a synthetic set generated in ``root`` when missing).
        download: let ``prepare_data`` fetch a missing Microsoft archive or Oxford-IIIT Pet.
        archive_sha256: expected SHA-256 of the Microsoft zip (downloaded, or found as
            ``root/kagglecatsanddogs_5340.zip``); None: the official archive's
            (:data:`MICROSOFT_SHA256`); ``"any"``: not checked (the digest is logged). For ImageNet,
            ``"any"`` skips torchvision's MD5 check of the official archives, anything else keeps it.
        classes: a subset of the classes: N (drawn at random with ``split_seed``) or a file of class
            ids one a line (ImageNet's WordNet ids, or folder names); None: all.
        images_per_class: at most this many training images of each class (drawn with ``split_seed``);
            an official test split keeps all its images of the chosen classes. None: all.
        demo_images_per_class, demo_seed: size and seed of the generated demo set.
        test_size, train_size, val_size: a count, a fraction of all usable images, or
            ``"rest"``. The test images are drawn first, then the training pool, and the
            validation images are carved out of the training pool (defaults: 1,000 test and
            24,000 train as in the demul/AlexNet replication, 1,000 of the 24,000 for validation).
            A dataset with an official test split (ImageNet's validation set) tests on all of it;
            ``test_size`` is then not used, the other two apply to its training images.
        split_seed: the split depends on this only, never on the training seed.
        seed: seed of the training order, crops, flips and colour noise; None takes the run's
            ``seed_everything`` (``PL_GLOBAL_SEED``), or 0.
        batch_size, eval_batch_size: training batch (§5: 128) and evaluation batch (None: the same).
        resize_size: side of the rescaled, centre-cropped images (§2: 256).
        exif_transpose: turn each image upright by its EXIF orientation tag before resizing, as
            a viewer shows it (the paper does not say; on by default, every such file is listed
            in ``bad_files.tsv`` either way).
        image_size: side of the crops fed to the network (227); the CLI links it to the model.
        random_crop, random_flip: §4.1's random crops and horizontal flips at training time
            (off: the centre crop, unflipped).
        mean: subtract the training set's mean image (``pixel``, §2), its mean colour
            (``channel``), or nothing (``none``).
        divide_std: also divide by the per-channel std of the training pixels (not in the paper);
            exposed as ``input_channel_std``.
        pca_noise_std: std of the fancy-PCA coefficients alpha (§4.1: 0.1; 0 switches it off).
        ten_patch_test: test on the average of the ten patches (§4.1) instead of the centre crop.
        fast_path: read from a pre-resized uint8 store (built once, rebuilt when files change)
            instead of decoding JPEGs every epoch.
        store_format: the store's format (:mod:`towers.data.shards`): ``raw`` uint8 rows (fastest
            reads), or ``jpeg`` re-encoded at ``resize_size`` (about a tenth of the disk).
        decode_on_device: a ``jpeg`` store's images are decoded in batches on the training device
            (``torchvision.io.decode_jpeg(list, device=...)``, nvJPEG on a GPU) instead of by the loader
            workers; None: on a CUDA device only (the workers then only read bytes).
        cache_dir: where the check results, the store, the statistics and the bad-file report
            live (None: ``root/.towers-cache``).
        num_workers: loader processes (None: CPU count - 1, at most 8).
        pin_memory: None pins only when CUDA is available.
        num_classes: the number of classes the data holds (2: cat and dog); the CLI passes it to the
            model (``--model.num_classes`` follows from it), and ``setup`` refuses data that has another.

    The preprocessing is one module, ``self.preprocess`` (:class:`towers.data.augment.Preprocessing`),
    whose buffers ``setup`` fills with the training statistics. The colour facts the model and the
    callback need (:class:`towers.data.ColourInputs`): ``input_channel_std`` (with ``divide_std``,
    else None) and ``rgb_eigenvectors``, known after ``setup``.
    """

    def __init__(
        self,
        root: str = "data",
        source: Literal["auto", "microsoft", "kaggle", "folders", "oxford_pet", "imagenet", "demo"] = "auto",
        download: bool = False,
        archive_sha256: str | None = None,
        classes: int | str | None = None,
        images_per_class: int | None = None,
        demo_images_per_class: int = 600,
        demo_seed: int = 0,
        test_size: Size = 1000,
        train_size: Size = 24000,
        val_size: Size = 1000,
        split_seed: int = 0,
        seed: int | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        resize_size: int = 256,
        exif_transpose: bool = True,
        image_size: int = 227,
        random_crop: bool = True,
        random_flip: bool = True,
        mean: Literal["pixel", "channel", "none"] = "pixel",
        divide_std: bool = False,
        pca_noise_std: float = 0.1,
        ten_patch_test: bool = False,
        fast_path: bool = True,
        store_format: Literal["raw", "jpeg"] = "raw",
        decode_on_device: bool | None = None,
        cache_dir: str | None = None,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        num_classes: int = 2,
    ):
        super().__init__()
        if image_size > resize_size:
            raise BadOption(f"image_size={image_size} is larger than resize_size={resize_size}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise BadOption(f"batch_size={batch_size} and eval_batch_size={eval_batch_size} must be at least 1")
        for name, value in (("split_seed", split_seed), ("seed", seed), ("demo_seed", demo_seed)):
            if value is not None and value < 0:  # NumPy's and torch's generators take no negative seed
                raise BadOption(f"--data.{name} {value}: a seed must be 0 or more")
        if num_workers is not None and num_workers < 0:
            raise BadOption(f"--data.num_workers {num_workers}: the loader processes must be 0 (none) or more")
        self.save_hyperparameters()
        self.root = Path(root)
        self.cache_dir = Path(cache_dir) if cache_dir else self.root / ".towers-cache"
        self.num_workers = min(8, max(0, (os.cpu_count() or 1) - 1)) if num_workers is None else num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.image_size, self.resize_size, self.num_classes = image_size, resize_size, num_classes
        self.preprocess = Preprocessing(resize_size, image_size, mean, pca_noise_std, divide_std)
        self.class_descriptions: list[str] = []

    # -------------------------------------------------------------- the statistics, once known

    def _statistic(self, name: str) -> torch.Tensor | None:
        return getattr(self.preprocess, name) if self.preprocess.known else None

    mean_image = property(lambda self: self._statistic("mean_image"))
    channel_mean = property(lambda self: self._statistic("channel_mean"))
    rgb_covariance = property(lambda self: self._statistic("rgb_covariance"))
    rgb_eigenvalues = property(lambda self: self._statistic("rgb_eigenvalues"))
    rgb_eigenvectors = property(lambda self: self._statistic("rgb_eigenvectors"))
    input_channel_std = property(lambda self: self._statistic("input_channel_std"))

    def source(self) -> str | Subset:
        """What :func:`towers.data.sources.find` is given: the layout, or a subset of it."""
        hp = self.hparams
        if hp.classes is None and hp.images_per_class is None:
            return hp.source
        return Subset(hp.source, hp.classes, hp.images_per_class, hp.split_seed)

    # -------------------------------------------------------------- prepare: downloads, checks, store

    def prepare_data(self) -> None:
        """Generate or download what is missing, check every file, build the fast-path store."""
        hp = self.hparams
        obtain(self.root, hp.source, hp.download, hp.archive_sha256, hp.demo_images_per_class, hp.demo_seed)
        self._prepare_state()

    # -------------------------------------------------------------- setup: splits and statistics

    def setup(self, stage: str | None = None) -> None:
        if getattr(self, "train_files", None) is None:
            self._prepare_state()
        if self.num_classes != len(self.classes):
            shown = self.classes if len(self.classes) <= 10 else self.classes[:10] + ["..."]
            raise BadOption(
                f"The data has {len(self.classes)} classes {shown} but "
                f"num_classes={self.num_classes}; set --data.num_classes {len(self.classes)}"
            )
        trainer = getattr(self, "trainer", None)
        if stage in (None, "fit") and trainer is not None:  # only a trainer trains on it
            self._check_steps(trainer)

    def _check_steps(self, trainer) -> None:
        """Refuse a training split that gives no full batch: the loader drops the last partial batch,
        so such a run would train on nothing and still report itself finished."""
        replicas = trainer.world_size
        per_replica = -(-len(self.train_files) // replicas)  # DistributedSampler pads to equal shares
        steps = per_replica // self.hparams.batch_size
        if steps == 0:
            shared = f", shared by {replicas} processes ({per_replica} each)" if replicas > 1 else ""
            raise BadOption(
                f"the training split has {len(self.train_files)} images{shared}, fewer than one batch "
                f"of batch_size={self.hparams.batch_size}, so an epoch would have 0 steps; use a smaller "
                f"--data.batch_size or a larger --data.train_size"
            )

    def _prepare_state(self) -> None:
        """Check the files, split them, compute the training statistics; every step cached on disk."""
        hp = self.hparams
        index = index_images(
            self.root,
            self.source(),
            self.cache_dir,
            hp.resize_size,
            hp.exif_transpose,
            hp.fast_path,
            self.num_workers,
            store_format=hp.store_format,
        )
        self.layout, self.base, self.classes, self.usable = index.layout, index.base, index.classes, index.usable
        self.store_path, self.store_rows, self.bad_files_report = (
            index.store_path,
            index.store_rows,
            index.bad_files_report,
        )
        if self.layout == "imagenet":
            from towers.data.sources.imagenet import devkit

            words = devkit(self.base)[0]
            self.class_descriptions = [", ".join(words.get(c, ())) for c in self.classes]
        prefix = OFFICIAL_TEST_PREFIX.get(self.layout)
        official = [item for item in self.usable if prefix and item[0].startswith(prefix)]
        if official:  # the dataset's own test split; validation carved from its training images
            pool = [item for item in self.usable if not item[0].startswith(prefix)]
            self.train_files, self.val_files, _ = split_files(
                pool, 0, hp.train_size, hp.val_size, hp.split_seed, self.base, self.bad_files_report
            )
            self.test_files = official
        else:
            self.train_files, self.val_files, self.test_files = split_files(
                self.usable, hp.test_size, hp.train_size, hp.val_size, hp.split_seed, self.base, self.bad_files_report
            )
        self._check_every_class_is_trained_on()
        statistics = training_statistics(
            self.dataset(self.train_files),
            [self.train_files, self.store_path.name],
            self.cache_dir,
            hp.resize_size,
            hp.divide_std,
            self.num_workers,
        )
        self.preprocess.set_statistics(statistics)

    def _check_every_class_is_trained_on(self) -> None:
        """Refuse a training split in which a class has no image: such a run would train a C-class
        model on fewer classes and still report itself finished. Names the class and its skipped files."""
        counts = torch.bincount(torch.tensor([label for _, label in self.train_files]), minlength=len(self.classes))
        empty = [c for c in range(len(self.classes)) if counts[c] == 0]
        if not empty:
            return
        c = empty[0]
        usable = sum(label == c for _, label in self.usable)
        if usable:
            why = f"its {usable} usable images all went to the validation and test splits"
        else:
            found = find(self.root, self.source())
            mine = [f for f, label in found.files if label == c]
            reasons = {}
            for line in self.bad_files_report.read_text().splitlines()[1:]:
                file, action, reason = (line.split("\t") + ["", ""])[:3]
                reasons[file] = reason
            shown = [
                f"{shown_path(found.base / f)} ({reasons.get(shown_path(found.base / f), 'skipped')})" for f in mine
            ]
            why = (
                f"none of its {len(mine)} files is usable: {'; '.join(shown[:5])}{'; ...' if len(shown) > 5 else ''}"
                if mine
                else "no file of it was found"
            )
        others = f" (and {len(empty) - 1} more classes)" if len(empty) > 1 else ""
        raise MissingData(
            f"the training split has no image of class {self.classes[c]!r}{others}: {why}; "
            f"the full list of skipped files: {self.bad_files_report}"
        )

    def dataset(self, files: list[tuple[str, int]]) -> Dataset:
        labels = [label for _, label in files]
        if self.hparams.fast_path:
            rows = [self.store_rows[f] for f, _ in files]
            if self._decode_on_device():
                return StoreImages(self.store_path, rows, labels, decode="device")
            return StoreImages(self.store_path, rows, labels)
        return ImageFiles(
            self.base, [f for f, _ in files], labels, self.hparams.resize_size, self.hparams.exif_transpose
        )

    def _decode_on_device(self) -> bool:
        """JPEG bytes from the loader, decoded in batches on the device in on_before_batch_transfer."""
        hp = self.hparams
        if not hp.fast_path or hp.store_format != "jpeg":
            return False
        if hp.decode_on_device is not None:
            return hp.decode_on_device
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    # -------------------------------------------------------------- loaders

    def _loader(self, files, batch_size, sampler=None, drop_last=False) -> DataLoader:
        # Its own generator: otherwise every new iterator takes a draw from the global RNG (for the
        # workers' base seed), which would shift the dropout masks of a resumed run.
        return DataLoader(
            self.dataset(files),
            batch_size=batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self._seed()),
            collate_fn=collate_encoded if self._decode_on_device() else None,
        )

    def _seed(self) -> int:
        return self.hparams.seed if self.hparams.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        # A DistributedSampler even on one device: its order is a function of (seed, epoch) only, and
        # Lightning calls its set_epoch at every epoch and leaves it alone under DDP.
        sampler = DistributedSampler(
            self.dataset(self.train_files),
            shuffle=True,
            seed=self._seed(),
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
        )
        return self._loader(self.train_files, self.hparams.batch_size, sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_files, self.hparams.eval_batch_size or self.hparams.batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_files, self.hparams.eval_batch_size or self.hparams.batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    # -------------------------------------------------------------- augmentation on batches

    def draw_augmentation(self, indices: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        """Crop offsets, flips and colour-noise coefficients for one training batch, a function of
        (seed, epoch, batch) only: :func:`towers.data.augment.draw_augmentation` with this module's settings."""
        hp = self.hparams
        return draw_augmentation(
            indices,
            epoch,
            self._seed(),
            hp.resize_size,
            hp.image_size,
            hp.pca_noise_std,
            hp.random_crop,
            hp.random_flip,
        )

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        images, labels, indices = batch
        trainer = self.trainer
        if isinstance(images, list):  # a JPEG store's bytes (decode_on_device): one batched decode there
            images = decode_batch(images, trainer.strategy.root_device if trainer is not None else "cpu")
        draws = (
            self.draw_augmentation(indices, trainer.current_epoch) if trainer is not None and trainer.training else None
        )
        return images, labels, draws

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels, draws = batch
        trainer = self.trainer
        ten = self.hparams.ten_patch_test and trainer is not None and trainer.testing
        return self.transform(images, draws, ten_patch=ten), labels

    def transform(self, images: torch.Tensor, draws: dict | None = None, ten_patch: bool = False) -> torch.Tensor:
        """uint8 (B, 3, R, R) -> float (B, 3, S, S) crops minus the mean (+ PCA noise when ``draws``):
        ``self.preprocess``, moved to the device of ``images`` (once: its buffers then live there).

        ``draws`` from :meth:`draw_augmentation` for training; None for the centre crop, or with
        ``ten_patch`` the ten patches as (B, 10, 3, S, S). See :class:`towers.data.augment.Preprocessing`.
        """
        return self.preprocess.to(images.device)(images, draws, ten_patch)

    # -------------------------------------------------------------- what a checkpoint records

    def state_dict(self) -> dict:
        """The classes trained on (a subset's are drawn from its settings): kept in every checkpoint."""
        return {"classes": list(getattr(self, "classes", [])), "class_descriptions": self.class_descriptions}

    def load_state_dict(self, state_dict: dict) -> None:
        saved, now = state_dict.get("classes"), getattr(self, "classes", None)
        if saved and now is not None and list(saved) != list(now):
            raise BadOption(
                f"the checkpoint was trained on {len(saved)} classes ({', '.join(saved[:3])}, ...) but this "
                f"data has {len(now)} ({', '.join(now[:3])}, ...); use the data and --data.classes of that run"
            )


CatsDogsDataModule = ImageDataModule  # its name before ImageNet; configs and saved runs name either
