"""Train, validate, test or predict with the N-tower AlexNet.

    python train.py fit --config configs/demo.yaml
    python train.py fit --config configs/paper.yaml --data.root /data/PetImages
    python train.py fit --config configs/paper.yaml --print_config
"""

from lightning.pytorch.cli import LightningCLI

from towers.module import TowerClassifier


def main(args=None):
    return LightningCLI(TowerClassifier, args=args)


if __name__ == "__main__":
    main()
