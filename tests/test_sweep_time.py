"""The sweep agent's time estimate: training images per epoch from the data options alone."""

import pytest

from towers.sweep_disk import training_images


@pytest.mark.parametrize(
    "data, images",
    [
        # Cats-vs-Dogs as configs/paper.yaml: a pool of 24,000, 1,000 of them carved out for validation
        ({"source": "auto", "train_size": 24000, "val_size": 1000}, 23000),
        # ILSVRC-2012 as configs/imagenet.yaml: 1,281,167 training images, 10,000 carved out
        ({"source": "imagenet", "train_size": "rest", "val_size": 10000}, 1_271_167),
        # 100 of the 1,000 classes: a tenth of the images, 128,116.7 rounded
        ({"source": "imagenet", "train_size": "rest", "val_size": 1000, "classes": 100}, 127_117),
        ({"source": "imagenet", "train_size": "rest", "val_size": 0.1, "classes": 100, "images_per_class": 300}, 27000),
        ({"source": "imagenet", "train_size": 0.5, "val_size": 100, "classes": 10, "images_per_class": 100}, 400),
        ({"init_args": {"source": "imagenet", "train_size": 20000, "val_size": 1000}}, 19000),
        # only the data can say: the rest of a folder of images, or a file of class ids
        ({"source": "folders", "train_size": "rest", "val_size": 100}, None),
        ({"source": "imagenet", "train_size": "rest", "val_size": 100, "classes": "ids.txt"}, None),
    ],
)
def test_training_images_per_epoch(data, images):
    assert training_images(data) == images
