"""A Secret volume written the way the kubelet writes it, for the key-rotation tests."""

from __future__ import annotations

import os
from pathlib import Path


def kubelet_write(volume: Path, generation: str, keys: str) -> None:
    """What the kubelet's AtomicWriter does for a Secret volume with the item `api-keys`."""
    data_dir = volume / f"..{generation}"
    data_dir.mkdir()
    (data_dir / "api-keys").write_text(keys)
    tmp_link = volume / "..data_tmp"
    tmp_link.symlink_to(data_dir.name)
    os.replace(tmp_link, volume / "..data")  # atomic swap
    if not (volume / "api-keys").is_symlink():
        (volume / "api-keys").symlink_to("..data/api-keys")
    for old in volume.glob("..20*"):
        if old != data_dir:
            (old / "api-keys").unlink()
            old.rmdir()
