"""towers: does AlexNet's tower split make its first-layer kernels bisect by colour?"""

from towers.data import CatsDogsDataModule
from towers.model import TowerAlexNet
from towers.module import TowerClassifier

__all__ = ["CatsDogsDataModule", "TowerAlexNet", "TowerClassifier"]
