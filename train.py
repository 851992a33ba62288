"""Train, validate, test or predict with the N-tower AlexNet.

    python train.py fit --config configs/demo.yaml
    python train.py fit --config configs/paper.yaml --data.root /data/PetImages
    python train.py fit --config configs/paper.yaml --print_config
"""

from lightning.pytorch.cli import LightningCLI

from towers.data import CatsDogsDataModule
from towers.module import TowerClassifier


class TowersCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        # The crop size is stated once, as data.image_size; the model's fc6 input follows from it.
        parser.link_arguments("data.image_size", "model.image_size")


def main(args=None):
    return TowersCLI(TowerClassifier, CatsDogsDataModule, args=args)


if __name__ == "__main__":
    main()
