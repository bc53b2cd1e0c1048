import os

import pytest

import _dist

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any world starts: nothing is downloaded in tests


@pytest.fixture(scope="session", autouse=True)
def _close_worlds():
    yield
    _dist.shutdown()
