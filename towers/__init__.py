"""towers: does AlexNet's tower split make its first-layer kernels bisect by colour?"""

from towers.callbacks import KernelBisectionCallback
from towers.model import TowerAlexNet
from towers.module import TowerClassifier

__all__ = ["KernelBisectionCallback", "TowerAlexNet", "TowerClassifier"]
