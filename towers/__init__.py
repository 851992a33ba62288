"""towers: does AlexNet's tower split make its first-layer kernels bisect by colour?"""

import importlib

# Exported lazily (PEP 562): `towers.color`, `towers.files`, `towers.records`, `towers.measure`,
# `towers.figures` and the sweep agent's helpers import without Lightning, so the analysis scripts
# start in a fraction of the time and a checkpoint can be scored with torch and numpy alone.
_EXPORTS = {
    "CatsDogsDataModule": "towers.data",
    "ImageDataModule": "towers.data",
    "KernelBisectionCallback": "towers.callbacks",
    "TowerAlexNet": "towers.model",
    "TowerClassifier": "towers.module",
    "TowerParallelStrategy": "towers.parallel",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'towers' has no attribute {name!r}")
