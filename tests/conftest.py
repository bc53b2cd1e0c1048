import os

import pytest

import _dist

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any world starts: nothing is downloaded in tests


@pytest.fixture(scope="module")
def ray_local(request):
    """A local Ray of 2 CPUs for the module's tests (or the one already running). The
    rank actors cannot import test modules: the module's classes and functions, and
    those of the modules it names in ``RAY_BY_VALUE``, are sent by value."""
    ray = pytest.importorskip("ray")
    for module in (request.module, *getattr(request.module, "RAY_BY_VALUE", ())):
        ray.cloudpickle.register_pickle_by_value(module)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _close_worlds():
    yield
    _dist.shutdown()
