"""Fixtures shared by the test files."""

import pytest

from towers.data.demo import make_demo_dataset


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    """A tiny generated demo data set (16 images a class) in the Kaggle layout."""
    root = tmp_path_factory.mktemp("data") / "demo"
    make_demo_dataset(root, images_per_class=16, seed=0)
    return root
