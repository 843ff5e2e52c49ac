from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.dicom_node import Stack, running_dicom_stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One DICOM node stack for every node test module: each test sends studies with new UIDs and waits for them."""
    with running_dicom_stack(tmp_path_factory.mktemp("dicom-node")) as s:
        yield s
