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
