"""towers: does AlexNet's tower split make its first-layer kernels bisect by colour?"""

from towers.callbacks import KernelBisectionCallback
from towers.model import TowerAlexNet
from towers.module import TowerClassifier
from towers.parallel import TowerParallelStrategy

__all__ = ["KernelBisectionCallback", "TowerAlexNet", "TowerClassifier", "TowerParallelStrategy"]
