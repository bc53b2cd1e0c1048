import pytest

import _dist


@pytest.fixture(scope="session", autouse=True)
def _close_worlds():
    yield
    _dist.shutdown()
