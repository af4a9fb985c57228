"""Fixtures shared by several test files, and the ``slow`` marker put on every test that starts processes."""

import inspect
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_helpers import write_noise_split

# What starts another Python process: a script run, torchrun, a spawned process group.
_SPAWNS = re.compile(r"subprocess\.|Popen|torchrun|mp\.spawn|multiprocessing|sys\.executable")


def _spawning_names(module) -> set[str]:
    """Names of the module's functions and constants whose source starts processes (one level deep)."""
    names = set()
    for name, obj in vars(module).items():
        try:
            source = inspect.getsource(obj) if inspect.isfunction(obj) else None
        except (OSError, TypeError):
            source = None
        if (source and _SPAWNS.search(source)) or (isinstance(obj, list | tuple) and "torchrun" in str(obj)):
            names.add(name)
    return names


def pytest_collection_modifyitems(config, items):
    """Mark ``slow`` each test that starts processes, itself or through a helper of its module, so that
    ``pytest -m "not slow"`` is the in-process suite."""
    spawning: dict[object, set[str]] = {}
    for item in items:
        function = getattr(item, "function", None)
        if function is None or item.get_closest_marker("slow"):
            continue
        module = inspect.getmodule(function)
        if module not in spawning:
            spawning[module] = _spawning_names(module)
        source = inspect.getsource(function)
        if _SPAWNS.search(source) or any(re.search(rf"\b{re.escape(n)}\b", source) for n in spawning[module]):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _seeded():
    """Each test starts from the same random state, whatever ran before it: an unseeded draw (a random input to a
    shape check, a random file) gives the same values on every machine, so a CI run cannot fail by chance."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


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
