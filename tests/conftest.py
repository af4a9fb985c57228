"""Fixtures shared by several test files."""

from pathlib import Path

import pytest
from test_data_helpers import write_noise_split


@pytest.fixture(scope="module")
def noise_root(tmp_path_factory) -> Path:
    """A small ImageFolder of noise JPEGs: 50 train and 101 val images (a prime, for sharding) over WNIDS."""
    root = tmp_path_factory.mktemp("noise")
    write_noise_split(root, "train", 50, seed=1)
    write_noise_split(root, "val", 101, seed=2)
    return root


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """A small ImageFolder of noise JPEGs for training runs: 48 train and 20 val images."""
    root = tmp_path_factory.mktemp("folder")
    write_noise_split(root, "train", 48, seed=0)
    write_noise_split(root, "val", 20, seed=1)
    return root
