import os
import sys

import pytest

import _dist

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any world starts: nothing is downloaded in tests

# The files that take a minute or more (a few long end-to-end tests each), first. `make test`
# hands its two workers one file at a time in collection order (--no-loadscope-reorder:
# xdist would otherwise order files by their number of tests, which put these last, where
# the final one ran alone for minutes).
SLOW_FIRST = ("test_entrypoints.py", "test_driver.py", "test_chaos.py", "test_bench.py", "test_resume.py",
              "test_driver_checkpoint.py", "test_serve.py", "test_examples.py", "test_compile.py",
              "test_serve_cli.py", "test_seam.py")


def pytest_collection_modifyitems(items):
    order = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(SLOW_FIRST)))  # stable: files stay whole


@pytest.fixture(scope="module")
def ray_local(request):
    """A local Ray of 2 CPUs for the module's tests (or the one already running). The
    rank actors cannot import test modules: the module's classes and functions, and
    those of the modules it names in ``RAY_BY_VALUE``, are sent by value.

    The Ray is kept for the next module of this pytest process that asks for it when the
    module left nothing in it (no live actor or placement group): a start and a shutdown
    cost 8-15 s on two busy cores, about 20 times in a run."""
    ray = pytest.importorskip("ray")
    for module in (request.module, *getattr(request.module, "RAY_BY_VALUE", ())):
        ray.cloudpickle.register_pickle_by_value(module)
    if not ray.is_initialized():
        _start(ray)
    yield
    if ray.is_initialized() and _left_behind(ray):
        ray.shutdown()


def _start(ray) -> None:
    """``ray.init``, tried twice: Ray waits a hard-coded 30 s for its raylet to register, which
    two cores busy with the other worker's processes can miss ("The current node timed out
    during startup"; ray-project/ray#47087, #62883)."""
    try:
        ray.init(num_cpus=2, include_dashboard=False)
    except Exception as e:
        if "timed out during startup" not in str(e):
            raise
        ray.shutdown()
        ray.init(num_cpus=2, include_dashboard=False)


def _left_behind(ray) -> bool:
    """Whether the Ray holds a live actor or placement group (or cannot say)."""
    try:
        from ray._private import state

        actors = [a for a in state.actors().values() if a["State"] != "DEAD"]
        groups = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
    except Exception:
        return True
    return bool(actors or groups)


@pytest.fixture(scope="module", autouse=True)
def _no_kept_ray_for_other_modules(request):
    """A module that does not use ``ray_local`` finds no Ray in its process, as when it ran
    alone: raytp starts its own (or none is needed)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized() and not _uses_ray_local(request):
        ray.shutdown()
    yield


def _uses_ray_local(request) -> bool:
    return any("ray_local" in getattr(item, "fixturenames", ())
               for item in request.session.items if getattr(item, "module", None) is request.module)


@pytest.fixture(scope="session", autouse=True)
def _close_worlds():
    yield
    _dist.shutdown()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
