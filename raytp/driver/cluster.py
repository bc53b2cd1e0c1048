"""``TPCluster``: the driver side of raytp."""

from __future__ import annotations

import atexit
import logging
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import ray

from actors.telemetry import record_stragglers
from raytp import validate
from raytp.comm.backends import get_backend
from raytp.driver import checkpointing, launch, recovery
from raytp.driver.errors import RECOVERABLE, RankDied, RankError
from raytp.driver.health import HealthMonitor
from raytp.driver.pending import Pending, PutBatch
from raytp.driver.progress import fit_loop
from raytp.driver.recovery import RecoveryPolicy
from raytp.engine import ON_NAN
from raytp.metrics import summarize_step
from raytp.nn.tuning import OVERLAP
from raytp.optim import AdamW

log = logging.getLogger(__name__)

_open: weakref.WeakSet = weakref.WeakSet()


class TPCluster:
    """``tp x dp`` rank actors on a Ray cluster, one per GPU (or CPU rank), and the
    phases of training on them.

    Connects to a running Ray cluster (``address``, ``RAY_ADDRESS``, or the one this
    process is in) or starts an embedded local one. Raises a clear error within
    ``timeout_s`` when the cluster cannot place the ranks. ``backend`` names a
    registered collective backend (:mod:`raytp.comm.backends`): "torch"
    (torch.distributed: NCCL on GPUs, gloo on CPU; the default, also "auto"), "cupy-nccl"
    (NCCL communicators made through CuPy from unique ids the driver hands out; needs
    the ``cuda12``/``cuda13`` extra), or one added by :func:`raytp.comm.register_backend`.
    Use it as a context manager, or call :meth:`close`.
    """

    _batch_checker = None  # checks batches on the driver; set by build() (raytp.validate)

    def __init__(self, tp: int = 2, dp: int = 1, device: str = "auto", backend: str = "auto",
                 address: str | None = None, timeout_s: float = 120.0, *,
                 phase_timeout_s: float | None = 600.0, log_level: int | str = logging.INFO,
                 max_failures: int = 0, checkpoint_dir: str | None = None, checkpoint_every: int = 0):
        for name, value in (("tp", tp), ("dp", dp)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        chosen = get_backend(backend)  # by name: raytp.comm.register_backend adds one
        chosen.check(device)
        self.tp, self.dp, self.world_size = tp, dp, tp * dp
        self.timeout_s, self.phase_timeout_s = timeout_s, phase_timeout_s
        self.recovery = RecoveryPolicy(max_failures, checkpoint_dir, checkpoint_every)
        self.failures: list[dict] = []  # each rank failure survived or not: rank, phase, cause, times
        self._log_level = logging._checkLevel(log_level)
        self._build_args: tuple | None = None
        self.actors: list = []
        self._pg = None
        self._built = False
        self._data_position = 0  # training batches consumed since build (or as loaded)
        self._rows: list[dict] = []
        self._history: list[dict] = []
        self._unread: list[Pending] = []
        self._phases: list[Pending] = []  # this step's forward and backward, until its step()
        self._health: HealthMonitor | None = None  # pings the ranks while they run
        self._last_phase = "start"  # the last call given to the ranks (what a dead rank was doing)
        self._batches_put = 0
        self._owns_ray = launch.connect(address)
        _open.add(self)
        try:
            self.device = launch.resolve_device(device, self.world_size)
            if self.device != device:  # what 'auto' chose
                chosen.check(self.device)
            self.backend = chosen.name if backend == "auto" else backend
            self._start()
        except BaseException:
            self.close()
            raise
        log.info("TPCluster ready: tp=%d dp=%d on %s", tp, dp, self.device)

    def _start(self) -> None:
        """Reserve the placement group, start the rank actors and join them."""
        self._pg = launch.reserve(self.tp, self.dp, self.device, self.timeout_s)
        self.actors, self.nodes = launch.start_actors(self._pg, self.tp, self.dp, self.device,
                                                      self._log_level, self.timeout_s)
        launch.rendezvous(self.actors, self.tp, self.dp, self.device, self.timeout_s, self.backend)
        self._health = HealthMonitor(self.actors, lambda: self._last_phase)

    # -- building -------------------------------------------------------------------

    def build(self, model, *, plan: Mapping[str, str] | None = None, loss_fn: Callable | None = None,
              optimizer=None, seed: int = 0, max_grad_norm: float | None = None,
              overlap: bool | str | None = None, on_nan: str = "raise") -> dict:
        """Build the model shard on every rank.

        ``model`` is a raytp model config (with ``build(mesh, device)``) or a picklable
        zero-argument callable returning a plain ``nn.Module``, parallelized on each
        rank with ``plan`` (see :func:`raytp.parallelize`). ``loss_fn(model, batch)``
        returns a scalar loss, or ``(loss, extra_metrics)``; by default the model's own
        ``loss(batch)``, or cross-entropy of ``model(batch["x"])`` against ``batch["y"]``.
        ``optimizer`` is an optimizer spec (default ``raytp.AdamW()``). Every rank seeds
        torch with ``seed`` first, so tp=N holds exactly the shards of tp=1's weights.
        ``overlap`` turns the overlap of collectives with GEMMs on or off (default: on
        on GPUs, off on CPU ranks; see :func:`raytp.nn.set_overlap`); ``"symm_mem"`` also
        runs the sequence-parallel pairs through torch's fused symmetric-memory ops where
        the GPUs can (:func:`raytp.nn.use_symm_mem`). ``on_nan`` is what a
        step with a NaN or infinite loss (or gradient norm) does: ``"raise"`` (a
        :class:`RankError` naming the step; no optimizer step) or ``"skip"`` (no optimizer
        step, ``"skipped": True`` in its metrics, and training goes on).

        From then on, every batch is checked on the driver before it is sent (see
        :mod:`raytp.validate`): by the model config's ``validate_batch``, or for a plain
        module under the default loss, against its first and last linear layers.
        """
        optimizer = optimizer if optimizer is not None else AdamW()
        if on_nan not in ON_NAN:
            raise ValueError(f"on_nan={on_nan!r} must be one of {ON_NAN}")
        if overlap not in OVERLAP:
            raise ValueError(f"overlap={overlap!r} must be one of {OVERLAP}")
        if hasattr(model, "check_tp"):  # a raytp config: sizes tp must divide, named here
            model.check_tp(self.tp)
        if not (hasattr(model, "build") or callable(model)):
            raise TypeError(f"model must be a raytp model config or a zero-argument callable, "
                            f"got {type(model).__name__}")
        for name, value in (("model", model), ("loss_fn", loss_fn), ("plan", plan),
                            ("optimizer", optimizer)):
            _check_picklable(name, value)
        args = {"model": model, "plan": plan, "loss_fn": loss_fn, "optimizer": optimizer, "seed": seed,
                "max_grad_norm": max_grad_norm, "overlap": overlap, "on_nan": on_nan}
        self._check_alive()
        self._last_phase = "build"
        infos = self._wait([a.build.remote(*args.values()) for a in self.actors], "build")
        self._build_args = args  # what recover() builds again, once it built here
        self._built, self._data_position = True, 0
        self._batch_checker = infos[0]["batch_checker"]
        return {"params": infos[0]["params"], "param_bytes_per_rank": [i["param_bytes"] for i in infos]}

    # -- phases -----------------------------------------------------------------------

    def forward(self, batch: Mapping[str, Any]) -> Pending:
        """Submit the forward pass (loss) on every rank; returns at once."""
        put = self.put_batch(batch)
        self._data_position += 1
        pending = self._submit("forward", [(ref, put.id) for ref in put.refs])
        self._phases = [pending]
        return pending

    def backward(self) -> Pending:
        """Submit the backward pass on every rank; returns at once."""
        pending = self._submit("backward")
        self._phases.append(pending)
        return pending

    def step(self) -> Pending:
        """Submit gradient sync and the optimizer step; its result is the step's metrics
        (or the error of this step's forward or backward on any rank)."""
        pending = self._submit("step", finish=self._record, after=self._phases)
        self._phases = []
        return pending

    def train_step(self, batch: Mapping[str, Any]) -> dict:
        """Forward, backward and step on every rank (one call per rank); the step's summary."""
        return self.submit_train_step(batch).result()

    def submit_train_step(self, batch, prefetch: PutBatch | None = None) -> Pending:
        """Submit one training step on ``batch`` (a dict of arrays, or one already put with
        :meth:`put_batch`). ``prefetch``, the next step's put batch, is copied to the
        devices while this step runs (on GPUs, on each rank's data stream)."""
        put = batch if isinstance(batch, PutBatch) else self.put_batch(batch)
        nxt = prefetch.refs if prefetch is not None else [None] * self.world_size
        next_id = prefetch.id if prefetch is not None else None
        args = [(ref, put.id, n, next_id) for ref, n in zip(put.refs, nxt, strict=True)]
        self._data_position += 1
        return self._submit("train_step", args, finish=self._record)

    def evaluate(self, batch: Mapping[str, Any]) -> dict:
        """Loss (and the loss function's extras) without gradients, averaged over DP groups."""
        return self.submit_evaluate(batch).result()

    def submit_evaluate(self, batch: Mapping[str, Any]) -> Pending:
        return self._submit("evaluate", [(ref,) for ref in self.put_batch(batch).refs],
                            finish=self._mean_over_dp)

    def _mean_over_dp(self, results: list[dict]) -> dict:
        leaders = results[:: self.tp]
        return {k: float(np.mean([r[k] for r in leaders])) for k in leaders[0]}

    def run(self, method: str | Callable, *args, per_rank_args: list[tuple] | None = None) -> list:
        """Call ``method`` on every rank and return the results in rank order.

        ``method`` names a :class:`~actors.RankActor` method, or is a picklable
        function called as ``fn(actor, *args)``. The same ``args`` go to every rank;
        per-rank arguments are given explicitly, one tuple per rank, as ``per_rank_args``.
        """
        if per_rank_args is not None and len(per_rank_args) != self.world_size:
            raise ValueError(f"per_rank_args has {len(per_rank_args)} entries for "
                             f"{self.world_size} ranks")
        self._check_alive()
        self._last_phase = name = getattr(method, "__name__", str(method))
        refs = []
        for rank, actor in enumerate(self.actors):
            rank_args = tuple(per_rank_args[rank]) if per_rank_args is not None else args
            if callable(method):
                refs.append(actor.call.remote(method, *rank_args))
            else:
                refs.append(getattr(actor, method).remote(*rank_args))
        return self._wait(refs, name)

    def fit(self, batches: Iterable[Mapping[str, Any]], *, steps: int | None = None,
            eval_batch: Mapping[str, Any] | None = None, eval_every: int = 0,
            progress: bool = True) -> list[dict]:
        """Train on ``batches`` (at most ``steps`` of them) with a progress bar showing the
        step, the loss and the throughput; evaluate ``eval_batch`` every ``eval_every``
        steps. Step k+1 is submitted before step k's metrics are read, so the ranks never
        wait for the driver. Returns the per-step history."""
        return fit_loop(self, batches, steps=steps, eval_batch=eval_batch, eval_every=eval_every,
                        progress=progress)

    # -- metrics ----------------------------------------------------------------------

    def metrics(self) -> list[dict]:
        """Every step's metrics on every rank, as rows with a ``rank`` column."""
        self._drain()
        return list(self._rows)

    @property
    def history(self) -> list[dict]:
        """One summary per step: loss, slowest rank's step time, throughput, memory."""
        self._drain()
        return list(self._history)

    # -- internals ----------------------------------------------------------------------

    def _submit(self, phase: str, args: list[tuple] | None = None, finish=None,
                after: list[Pending] | None = None) -> Pending:
        """One call of ``phase`` per rank, with that rank's ``args``; ``after``, the calls
        whose errors its result raises first."""
        self._check_alive()
        if not self._built:
            raise RuntimeError(f"{phase}() before build(): call cluster.build(model, ...) first")
        args = args if args is not None else [()] * self.world_size
        refs = [getattr(a, phase).remote(*arg) for a, arg in zip(self.actors, args, strict=True)]
        self._last_phase = phase
        pending = Pending(self, refs, phase, finish, after)
        if finish == self._record:  # a training step: its metrics join the history when read
            self._unread.append(pending)
        return pending

    def _check_alive(self) -> None:
        if self.actors:
            try:  # a rank the health monitor saw die since the last call
                launch.raise_if_dead(self._health, self._last_phase)
            except RankDied as e:
                raise self._fail(e) from None
            return
        if self.failures and not self.failures[-1].get("recovered"):
            raise RuntimeError(f"this TPCluster lost its ranks ({self.failures[-1]['error']}); "
                               "call recover() to rebuild them from the last checkpoint, or close()")
        raise RuntimeError("this TPCluster is closed")

    def _wait(self, refs: list, phase: str) -> list:
        """Every rank's result of one call; a rank that dies or a phase past its deadline
        tears the group down (naming where each rank was) before the error is raised."""
        try:
            return launch.wait_all(refs, phase, self.phase_timeout_s, self._health)
        except RECOVERABLE as e:
            raise self._fail(e) from None
        except RankError as e:  # the rank's own exception: the others may be stuck waiting for it
            raise recovery.settle(self, e, refs) from None

    def _fail(self, error: Exception) -> Exception:
        """Tear the group down after a rank failure (see :func:`recovery.tear_down`)."""
        return recovery.tear_down(self, error)

    def recover(self) -> dict:
        """Rebuild the ranks after a failure: a new placement group, actors and
        communicators, the model built again as before, and the last good checkpoint in
        ``checkpoint_dir`` loaded (none yet: the model starts from its seed again).
        Returns ``{"checkpoint", "data_position"}``."""
        return recovery.rebuild(self)

    def _teardown(self, grace_s: float = 5.0) -> None:
        if self._health is not None:
            self._health.stop()
            self._health = None
        launch.teardown(self.actors, self._pg, grace_s)
        self.actors, self._pg = [], None

    def _record(self, results: list[dict]) -> dict:
        summary = summarize_step(results, self.tp)
        slow = summary["stragglers"]
        self._rows.extend({**row, "rank": rank, "straggler": rank in slow}
                          for rank, row in enumerate(results))
        self._history.append(summary)
        record_stragglers(slow, self.world_size)
        return summary

    def _drain(self) -> None:
        while self._unread:
            self._unread.pop(0).result()

    def put_batch(self, batch: Mapping[str, Any]) -> PutBatch:
        """Put ``batch`` into the object store: one copy per DP group (its slice of the batch);
        every rank of a TP group reads the same object."""
        arrays = validate.as_arrays(batch)  # refused here, with a clear error, when it does not fit
        per_group = validate.check_dp(arrays, self.dp)
        if self._batch_checker is not None:
            self._batch_checker.validate_batch(arrays, self.tp)
        refs = [ray.put({k: v[d * per_group:(d + 1) * per_group] for k, v in arrays.items()})
                for d in range(self.dp)]
        self._batches_put += 1
        return PutBatch(self._batches_put, [refs[rank // self.tp] for rank in range(self.world_size)])

    def close(self) -> None:
        """Kill the rank actors and free the placement group (and Ray, if this started it)."""
        self._teardown()
        _open.discard(self)
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> TPCluster:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def __repr__(self):
        state = "closed" if not self.actors else self.device
        return f"TPCluster(tp={self.tp}, dp={self.dp}, {state})"

    # -- checkpoints (raytp.driver.checkpointing) ----------------------------------------

    @property
    def data_position(self) -> int:
        """Training batches consumed since ``build`` (``train_step``, ``forward``, ``fit``),
        as restored by :meth:`load`: skip that many to resume the data where it was."""
        return self._data_position

    def save(self, path: str, *, extra: dict | None = None) -> str:
        """Save a sharded checkpoint (model, optimizer state, step, RNG states, data position
        and the JSON-able ``extra``) to ``path``, atomically; see
        :func:`raytp.driver.checkpointing.save`."""
        return checkpointing.save(self, path, extra=extra)

    def load(self, path: str) -> dict:
        """Load a checkpoint saved at any tp into the built model; returns ``{"step",
        "data_position", "extra"}``."""
        return checkpointing.load(self, path)

    def plot_timeline(self, path: str, steps: int | None = None) -> str:
        """Draw where the time went, per rank and phase, in the last ``steps`` steps (all
        when None) into the PNG file ``path``; see :func:`raytp.timeline.plot_timeline`."""
        from raytp.timeline import plot_timeline  # matplotlib, only when asked for

        return plot_timeline(self.metrics(), path, steps=steps)

    def export_hf(self, path: str) -> str:
        """Write the model as a Hugging Face checkpoint (GPT-2 or Llama) at ``path``."""
        return checkpointing.export_hf(self, path)


def _check_picklable(name: str, value) -> None:
    try:
        ray.cloudpickle.dumps(value)
    except Exception as e:  # noqa: BLE001 - pickling raises anything
        raise TypeError(f"{name} cannot be pickled, so it cannot be sent to the ranks: "
                        f"{type(e).__name__}: {e}") from None


@atexit.register
def _close_all() -> None:
    for cluster in list(_open):
        cluster.close()
