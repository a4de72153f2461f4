"""Shared pytest fixtures."""

import os
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def cifar_small(tmp_path_factory):
    """A real CIFAR-10 image folder: train/<class>/ with 20 JPEGs per class, test/<class>/ with 10,
    taken member by member from the shared tarball ($CIFAR10_TAR or ../shared/data, about 1.5 s)."""
    tar = Path(os.environ.get("CIFAR10_TAR", REPO / ".." / "shared" / "data" / "cifar10-jpg.tar.gz"))
    if not tar.is_file():
        pytest.skip(f"shared CIFAR-10 tarball not found at {tar} (set CIFAR10_TAR)")
    out = tmp_path_factory.mktemp("cifar_small")
    want, count = {"train": 20, "test": 10}, {}
    with tarfile.open(tar, "r|gz") as tf:  # streaming: one pass, extract only what we keep
        for m in tf:
            parts = m.name.split("/")  # cifar10/<split>/<class>/NNNN.jpg
            if not m.isfile() or len(parts) != 4 or parts[1] not in want:
                continue
            key = (parts[1], parts[2])
            if count.get(key, 0) < want[parts[1]]:
                count[key] = count.get(key, 0) + 1
                m.name = "/".join(parts[1:])
                tf.extract(m, out, filter="data")
    return out
