"""``TPCluster``: the driver side of raytp.

Every phase follows one convention: ``submit_x(...)`` submits one call per rank and
returns a :class:`Pending` at once; ``x(...)`` is ``submit_x(...).result()``. Each call
reaches the rank's :class:`~raytp.engine.RankEngine` through ``RankActor.execute``.
"""

from __future__ import annotations

import atexit
import logging
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import ray

from raytp.driver import checkpointing, generation, launch, recovery, steplog
from raytp.driver.group import RankGroup
from raytp.driver.pending import Pending, PutBatch, put_batch
from raytp.driver.progress import fit_loop
from raytp.driver.recovery import RecoveryPolicy
from raytp.driver.steplog import StepLog, mean_over_dp
from raytp.engine import BuildSpec, InferenceOnly
from raytp.engine.rank import NO_OPTIMIZER
from raytp.engine.spec import DEFAULT_OPTIMIZER

log = logging.getLogger(__name__)

_open: weakref.WeakSet = weakref.WeakSet()


class TPCluster:
    """``tp x dp`` rank actors on a Ray cluster, one per GPU (or CPU rank), and the
    phases of training and inference on them.

    Connects to a running Ray cluster (``address``, ``RAY_ADDRESS``, or the one this
    process is in) or starts an embedded local one; a clear error within ``timeout_s``
    when it cannot place the ranks. ``backend`` names a registered collective backend
    (:mod:`raytp.comm.backends`): "torch" (NCCL on GPUs, gloo on CPU; also "auto"),
    "cupy-nccl" (CuPy NCCL communicators; the ``cuda12``/``cuda13`` extra), or one added by
    :func:`raytp.comm.register_backend`. A context manager (or call :meth:`close`). The
    ranks are ``self.group`` (:class:`RankGroup`), the steps' metrics ``self.steps`` (:class:`StepLog`).
    """

    def __init__(self, tp: int = 2, dp: int = 1, device: str = "auto", backend: str = "auto",
                 address: str | None = None, timeout_s: float = 120.0, *,
                 phase_timeout_s: float | None = 600.0, log_level: int | str = logging.INFO,
                 max_failures: int = 0, checkpoint_dir: str | None = None, checkpoint_every: int = 0):
        for name, value in (("tp", tp), ("dp", dp)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        launch.check_backend(backend, device)  # by name: raytp.comm.register_backend adds one
        self.tp, self.dp, self.world_size = tp, dp, tp * dp
        self.recovery = RecoveryPolicy(max_failures, checkpoint_dir, checkpoint_every)
        self.steps = StepLog(tp, self.world_size)
        self.spec: BuildSpec | None = None  # what the ranks were built from (recover() builds it again)
        self._data_position = 0  # training batches consumed since build (or as loaded)
        self._loaded_at = 0  # the data position a checkpoint restored, until the next fit() skips it
        self._phases: list[Pending] = []  # this step's forward and backward, until its step()
        self._batch_checker = None  # checks batches on the driver; set by build() (raytp.validate)
        self._batches_put = 0
        self._owns_ray = launch.connect(address)
        _open.add(self)
        try:
            self.device = launch.resolve_device(device, self.world_size)
            self.backend = launch.check_backend(backend, self.device)  # on what 'auto' chose
            self.group = RankGroup(tp, dp, self.device, self.backend, timeout_s=timeout_s,
                                   log_level=logging._checkLevel(log_level), phase_timeout_s=phase_timeout_s)
            self.group.start()
        except BaseException:
            self.close()
            raise
        log.info("TPCluster ready: tp=%d dp=%d on %s", tp, dp, self.device)

    @property
    def actors(self) -> list:
        return self.group.actors

    @property
    def failures(self) -> list[dict]:
        """Each rank failure, survived or not: its error, phase, ranks and times."""
        return self.group.failures

    @property
    def built(self) -> bool:
        return self.spec is not None

    # -- building -------------------------------------------------------------------

    def build(self, model, *, plan: Mapping[str, str] | None = None, loss_fn: Callable | None = None,
              optimizer=DEFAULT_OPTIMIZER, seed: int = 0, **options) -> dict:
        """Build the model shard on every rank from ``BuildSpec(model, plan=..., loss_fn=...,
        optimizer=..., seed=..., **options)`` (:class:`raytp.engine.BuildSpec` says what each
        option does and checks them, here on the driver), or from ``model``, a ``BuildSpec``.
        ``optimizer=None`` builds inference-only ranks. Every batch is then checked on the driver
        (:mod:`raytp.validate`). Returns sizes, rank bytes, the KV cache (Generation.sizes)."""
        spec = model if isinstance(model, BuildSpec) else BuildSpec(
            model=model, plan=plan, loss_fn=loss_fn, optimizer=optimizer, seed=seed, **options)
        infos = self.group.build(spec)  # checked here first: sizes, module names, pickling
        self.spec, self._data_position, self._loaded_at = spec, 0, 0
        self._batch_checker = infos[0]["batch_checker"]
        self.generation = generation.Generation(infos[0]["generation"])  # what generate() checks against
        return {"params": infos[0]["params"], "param_bytes_per_rank": [i["param_bytes"] for i in infos],
                "trains": spec.trains, "generation": self.generation.sizes}

    # -- phases: submit_x returns a Pending, x blocks -----------------------------------

    def submit_forward(self, batch: Mapping[str, Any]) -> Pending:  # forward(): kept for backward()
        put = self.put_batch(batch)
        self._data_position += 1
        self._phases = [self._submit("forward", [(ref, put.id) for ref in put.refs])]
        return self._phases[0]

    def forward(self, batch: Mapping[str, Any]) -> list[dict]:
        return self.submit_forward(batch).result()

    def submit_backward(self) -> Pending:
        self._phases.append(self._submit("backward", training=True))
        return self._phases[-1]

    def backward(self) -> list[dict]:
        return self.submit_backward().result()

    def submit_step(self) -> Pending:
        # its result: the step's summary, or the error of its forward or backward on any rank
        pending = self._submit("step", finish=self.steps.record, after=self._phases, training=True)
        self._phases = []
        return pending

    def step(self) -> dict:
        return self.submit_step().result()

    def submit_train_step(self, batch, prefetch: PutBatch | None = None) -> Pending:
        """One training step on ``batch`` (a dict of arrays, or one put with :meth:`put_batch`);
        ``prefetch``, the next step's put batch, is copied to the devices meanwhile."""
        self._need_training("train_step")
        put = batch if isinstance(batch, PutBatch) else self.put_batch(batch)
        nxt = prefetch.refs if prefetch is not None else [None] * self.world_size
        next_id = prefetch.id if prefetch is not None else None
        args = [(ref, put.id, n, next_id) for ref, n in zip(put.refs, nxt, strict=True)]
        self._data_position += 1
        return self._submit("train_step", args, finish=self.steps.record, training=True)

    def train_step(self, batch: Mapping[str, Any]) -> dict:  # forward, backward, step: one call per rank
        return self.submit_train_step(batch).result()

    def submit_evaluate(self, batch: Mapping[str, Any]) -> Pending:
        return self._submit("evaluate", [(ref,) for ref in self.put_batch(batch).refs],
                            finish=lambda results: mean_over_dp(results, self.tp))

    def evaluate(self, batch: Mapping[str, Any]) -> dict:  # loss and extras, no grad, mean over DP
        return self.submit_evaluate(batch).result()

    def submit_run(self, method: str | Callable, *args, per_rank_args: list[tuple] | None = None,
                   phase: str | None = None) -> Pending:
        if per_rank_args is not None and len(per_rank_args) != self.world_size:
            raise ValueError(f"per_rank_args has {len(per_rank_args)} entries for "
                             f"{self.world_size} ranks")
        per_rank = [tuple(a) for a in per_rank_args] if per_rank_args is not None else None
        name = phase or getattr(method, "__name__", str(method))
        refs = self.group.call(method, per_rank or [args] * self.world_size, phase=name)
        return Pending(self.group, refs, name)

    def run(self, method: str | Callable, *args, per_rank_args: list[tuple] | None = None,
            phase: str | None = None) -> list:
        """Call ``method`` on every rank and return the results in rank order.

        ``method`` names a :class:`~raytp.engine.RankEngine` method, or is a picklable
        function called as ``fn(actor, *args)``. The same ``args`` go to every rank;
        per-rank arguments are given explicitly, one tuple per rank, as ``per_rank_args``.
        ``phase`` names the call in errors and hang reports (default: the method's name).
        """
        return self.submit_run(method, *args, per_rank_args=per_rank_args, phase=phase).result()

    def gather(self, name: str):
        """The full parameter ``name`` (as in ``model.named_parameters()``; a vocabulary is
        padded to a multiple of tp) as a CPU tensor, from the ranks' DTensor views."""
        self._need_built("gather")
        return self.run("gather", name)[0]

    def fit(self, batches: Iterable[Mapping[str, Any]], *, steps: int | None = None,
            eval_batch: Mapping[str, Any] | None = None, eval_every: int = 0, progress: bool = True,
            log_dir: str | None = None, callbacks: Sequence = (), resume: bool = True) -> list[dict]:
        """Train on ``batches`` (at most its first ``steps``) with a progress bar; evaluate
        ``eval_batch`` every ``eval_every`` steps; ``callbacks`` get each step, evaluation and
        checkpoint (:mod:`raytp.driver.callbacks`; ``log_dir``: TensorBoard's). After
        :meth:`load`, :meth:`resume` or :meth:`recover`, ``resume`` skips the batches the
        checkpoint's data position says were consumed (:func:`raytp.driver.progress.fit_loop`)."""
        self._need_training("fit")
        skip, self._loaded_at = (self._loaded_at if resume else 0), 0
        try:
            return fit_loop(self, batches, steps=steps, eval_batch=eval_batch, eval_every=eval_every,
                            progress=progress, log_dir=log_dir, callbacks=callbacks, skip=skip)
        finally:
            self._loaded_at = 0  # a recovery in fit() loaded a checkpoint: fit() replayed from it

    def _submit(self, phase: str, args: list[tuple] | None = None, finish=None,
                after: list[Pending] | None = None, training: bool = False) -> Pending:
        if training:
            self._need_training(phase)
        self._need_built(phase)
        refs = self.group.call(phase, args)
        steps = self.steps if finish == self.steps.record else None  # its metrics join when read
        return Pending(self.group, refs, phase, finish, after, steps)

    def _need_built(self, phase: str) -> None:
        self.group.check_alive()
        if self.spec is None:
            raise RuntimeError(f"{phase}() before build(): call cluster.build(model, ...) first")

    def _need_training(self, phase: str) -> None:
        if self.spec is not None and not self.spec.trains:
            raise InferenceOnly(NO_OPTIMIZER.format(phase=phase).replace("on a rank", "on a cluster"))

    # -- generation: generate(prompts, raytp.SamplingParams(...)), stream, generation_stats
    generate, stream, generation_stats = generation.generate, generation.stream, generation.generation_stats

    # -- metrics ----------------------------------------------------------------------

    def metrics(self) -> list[dict]:
        """Every step's metrics on every rank, as rows with a ``rank`` column."""
        return self.steps.rows()

    @property
    def history(self) -> list[dict]:
        """One summary per step: loss, slowest rank's step time, throughput, memory."""
        return self.steps.history()

    def put_batch(self, batch: Mapping[str, Any]) -> PutBatch:
        """Put ``batch`` into the object store: one copy per DP group (its slice of the batch);
        every rank of a TP group reads the same object."""
        self._batches_put += 1
        return put_batch(batch, self.tp, self.dp, self._batch_checker, self._batches_put, self.spec)

    # -- checkpoints and recovery (raytp.driver.checkpointing, raytp.driver.recovery) -----

    @property
    def data_position(self) -> int:
        """Training batches consumed since ``build``, as restored by :meth:`load`."""
        return self._data_position

    def save(self, path: str, *, extra: dict | None = None) -> str:
        """Save a sharded checkpoint (model, optimizer state, step, RNG states, data position
        and the JSON-able ``extra``) to ``path``, atomically (:mod:`raytp.driver.checkpointing`)."""
        return checkpointing.save(self, path, extra=extra)

    def load(self, path: str) -> dict:
        """Load a checkpoint saved at any tp into the built model (the next :meth:`fit` skips
        the batches it covers); returns ``{"step", "data_position", "extra"}``."""
        state = checkpointing.load(self, path)
        self._data_position = self._loaded_at = state["data_position"]
        return state

    def export_hf(self, path: str, dtype: str | None = None) -> str:
        """Write the model as a Hugging Face checkpoint (GPT-2 or Llama) at ``path``, in ``dtype``."""
        return checkpointing.export_hf(self, path, dtype)

    def recover(self) -> dict:
        """Rebuild the ranks after a failure: a new placement group, actors and
        communicators, the model built again as before, and the last good checkpoint in
        ``checkpoint_dir`` loaded (none yet: the model starts from its seed again).
        Returns ``{"checkpoint", "data_position"}`` (:func:`raytp.driver.recovery.rebuild`)."""
        return recovery.rebuild(self)

    def resume(self) -> dict:
        """On a new driver: load the last good checkpoint in ``checkpoint_dir`` into the built
        model; the next :meth:`fit` skips its batches (:func:`raytp.driver.recovery.resume`)."""
        return recovery.resume(self)

    plot_timeline = steplog.plot_timeline  # (path, steps=None): where the time went, as a PNG

    # -- life -----------------------------------------------------------------------------

    def close(self) -> None:
        """Kill the rank actors and free the placement group (and Ray, if this started it)."""
        if hasattr(self, "group"):
            self.group.teardown()
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


@atexit.register
def _close_all() -> None:
    for cluster in list(_open):
        cluster.close()
