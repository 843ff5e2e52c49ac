"""ModelRepository's admission: announcing a request for several models is all-or-nothing."""

import pytest

from cxr_serving.errors import OverloadedError
from cxr_serving.lifecycle import BatchingConfig, ModelRepository
from tests.support.toy_service import BrightnessModel


class Named(BrightnessModel):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


async def test_a_model_that_sheds_withdraws_the_announcements_made_before_it():
    repo = ModelRepository(BatchingConfig(max_batch_size=1, max_batch_delay_ms=0, max_queue_size=1))
    for name in ("a", "b"):
        repo.add(Named(name))
    await repo.load_all()
    try:
        with repo.expect(["b"]):  # b is full: one request on its way
            with pytest.raises(OverloadedError, match="'b'"):
                with repo.expect(["a", "b"]):
                    pass
            assert repo._batchers["a"]._upcoming == 0  # a's announcement was withdrawn
            assert repo._batchers["b"]._upcoming == 1
        assert repo._batchers["b"]._upcoming == 0
        with repo.expect(["a", "b"]) as arrivals:  # room again for both
            assert sorted(arrivals) == ["a", "b"]
    finally:
        await repo.close()
