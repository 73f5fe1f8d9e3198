"""Where data files live and how their identity is checked."""

from __future__ import annotations

import hashlib
import os

DATA_DIR_ENV = "SCVIT_DATA_DIR"
"""Environment variable naming the data directory searched for named datasets."""


def sha256sum(path: str | os.PathLike, *, chunk_size: int = 1 << 22) -> str:
    """Hex SHA-256 digest of a file, read in chunks (files here can be tens of GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()
