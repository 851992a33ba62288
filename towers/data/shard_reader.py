"""Reading the store that :mod:`towers.data.shards` builds: rows by index as uint8 (3, R, R), a
dataset over them, and the batched JPEG decode for a GPU (or the CPU).

    open_store(manifest)      -> Store: store[row] (JPEG decoded on the CPU), store.encoded(row)
    StoreImages(path, rows, labels, decode="cpu" | "device")   the dataset a loader reads
    collate_encoded, decode_batch                              JPEG bytes in batches, decoded on the device
"""

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from towers.data.shards import DamagedCache, _load_manifest, _rebuild_hint, _suffix, damaged_shards


def open_store(manifest: Path, verify: bool = True) -> "Store":
    """The store of ``manifest``; :class:`DamagedCache` naming the first damaged shard if any is
    missing, cut, or (``verify``) not what was written. ``verify=False`` checks sizes only (loader workers)."""
    manifest = Path(manifest)
    damaged = damaged_shards(manifest, verify)
    if damaged:
        shard_id, why = damaged[0]
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        raise DamagedCache(f"store shard {shard_id} of {manifest}: {why}{more}; {_rebuild_hint(manifest)}")
    return Store(manifest)


class Store:
    """The images of a store by row: ``store[row]`` is uint8 (3, R, R) (JPEG decoded on the CPU),
    ``store.encoded(row)`` a JPEG store's bytes as a uint8 tensor. Shards are mapped on first use."""

    def __init__(self, manifest: Path):
        record = _load_manifest(manifest)
        self.manifest, self.format, self.resize_size = manifest, record["format"], record["resize_size"]
        self.shard_dir = manifest.parent / manifest.name.rsplit("-", 1)[0]
        self.ids = [shard["id"] for shard in record["shards"]]
        self.starts = np.cumsum([0] + [shard["rows"] for shard in record["shards"]])
        self._maps: dict[int, np.ndarray] = {}
        self._offsets: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, row: int) -> tuple[int, int]:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} of a store of {len(self)}")
        shard = int(np.searchsorted(self.starts, row, side="right")) - 1
        return shard, row - int(self.starts[shard])

    def _map(self, shard: int) -> np.ndarray:
        if shard not in self._maps:
            path = self.shard_dir / f"{self.ids[shard]}{_suffix(self.format)}"
            if self.format == "raw":
                self._maps[shard] = np.load(path, mmap_mode="r")
            else:
                self._maps[shard] = (
                    np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
                )
                self._offsets[shard] = json.loads((self.shard_dir / f"{self.ids[shard]}.json").read_bytes())["offsets"]
        return self._maps[shard]

    def encoded(self, row: int) -> torch.Tensor:
        shard, i = self._locate(row)
        data = self._map(shard)
        if self.format != "jpeg":
            raise ValueError(f"{self.manifest} is a {self.format} store: no encoded images")
        start, end = self._offsets[shard][i : i + 2]
        return torch.from_numpy(np.array(data[start:end]))

    def __getitem__(self, row: int) -> np.ndarray:
        shard, i = self._locate(row)
        data = self._map(shard)
        if self.format == "raw":
            return data[i]
        encoded = self.encoded(row)
        if encoded.numel() == 0:  # an unusable file: a zero image, as in a raw store
            return np.zeros((3, self.resize_size, self.resize_size), np.uint8)
        return decode_batch([encoded], "cpu")[0].numpy()

    def __getstate__(self):  # loader workers map the shards themselves
        return {**self.__dict__, "_maps": {}, "_offsets": {}}


# ----------------------------------------------------------------------------- datasets and batches


class StoreImages(Dataset):
    """Rows of a store as a dataset: items ``(image, label, index)``; the image is uint8 (3, R, R), or
    with ``decode="device"`` (a JPEG store) its JPEG bytes, to be decoded in batches on the device by
    :func:`decode_batch` after :func:`collate_encoded`."""

    def __init__(self, path: Path, rows: list[int], labels: list[int], decode: str = "cpu"):
        self.path, self.rows, self.labels, self.decode = Path(path), rows, labels, decode
        self._store = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        if self._store is None:  # opened lazily, so each loader worker maps the shards itself
            self._store = open_store(self.path, verify=False)
        row = self.rows[index]
        if self.decode == "device":
            return self._store.encoded(row), self.labels[index], index
        return torch.from_numpy(np.array(self._store[row])), self.labels[index], index

    def __getstate__(self):
        return {**self.__dict__, "_store": None}


def collate_encoded(batch: list) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """A loader's ``collate_fn`` for encoded images: (list of JPEG byte tensors, labels, indices)."""
    encoded, labels, indices = zip(*batch)
    return list(encoded), torch.tensor(labels), torch.tensor(indices)


def decode_batch(encoded: list[torch.Tensor], device: torch.device | str) -> torch.Tensor:
    """JPEG byte tensors -> uint8 (B, 3, R, R) on ``device``: one batched nvJPEG call on a GPU
    (``torchvision.io.decode_jpeg(list, device="cuda")``), libjpeg-turbo on the CPU."""
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    encoded = [e.cpu() for e in encoded]  # decode_jpeg takes its input on the CPU whatever the device
    images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    return torch.stack(images)
