"""towers: does AlexNet's tower split make its first-layer kernels bisect by colour?"""

from towers.callbacks import KernelBisectionCallback
from towers.data import CatsDogsDataModule
from towers.model import TowerAlexNet
from towers.module import TowerClassifier
from towers.parallel import TowerParallelStrategy

__all__ = ["CatsDogsDataModule", "KernelBisectionCallback", "TowerAlexNet", "TowerClassifier", "TowerParallelStrategy"]
