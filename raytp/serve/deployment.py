"""The Ray Serve deployment: one replica owns an inference-only :class:`raytp.TPCluster`
and its continuous batch (:class:`raytp.driver.serving.Batcher`), and answers the
OpenAI routes through FastAPI (:class:`raytp.serve.service.CompletionService`).

With an ``api_key`` every route needs ``Authorization: Bearer <key>`` (compared in
constant time); 401 otherwise. Errors are OpenAI's JSON bodies; a 503 says when to
retry (``Retry-After``). Ray Serve calls ``__del__`` when it stops a replica (its one
shutdown hook): the batcher stops and the ranks and their placement group go.

(No ``from __future__ import annotations`` here: FastAPI reads the routes' annotations.)
"""


import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from raytp.serve.protocol import ApiError

log = logging.getLogger(__name__)

api = FastAPI(title="raytp", docs_url=None, redoc_url=None, openapi_url=None)


@dataclass(frozen=True)
class ServeSettings:
    """What the replica builds: the checkpoint at ``pretrained_path`` on ``tp x dp`` ranks
    of ``device`` in ``dtype``, a KV cache of ``max_batch`` slots of ``max_len`` positions
    (None: sized from memory), served as ``model_name`` (None: the directory's name);
    ``phase_timeout_s`` bounds every call of the ranks (a hung collective is a failure)."""

    pretrained_path: str
    tp: int = 2
    dp: int = 1
    max_batch: int | None = None
    max_len: int | None = None
    device: str = "auto"
    dtype: str = "float32"
    api_key: str | None = None
    model_name: str | None = None
    cuda_graphs: bool = True
    phase_timeout_s: float = 120.0

    def __post_init__(self):
        if not (Path(self.pretrained_path) / "config.json").is_file():
            raise ValueError(f"pretrained_path={self.pretrained_path!r} holds no config.json: give the "
                             "directory of a Hugging Face checkpoint (save_pretrained)")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty string (or None: no key)")

    @property
    def name(self) -> str:
        return self.model_name or Path(self.pretrained_path).resolve().name


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024, health_check_period_s=5)
@serve.ingress(api)
class CompletionServer:
    """``POST /v1/completions``, ``GET /v1/models``, ``GET /health`` and ``GET /stats``
    (the batch's counters) over one TP cluster (see the module docstring)."""

    def __init__(self, settings: ServeSettings):
        import raytp
        from raytp.driver.serving import Batcher
        from raytp.serve.service import CompletionService
        from raytp.serve.text import eos_ids, load_tokenizer

        self.settings, self._key = settings, (settings.api_key or "").encode()
        self.cluster = raytp.TPCluster(tp=settings.tp, dp=settings.dp, device=settings.device,
                                       phase_timeout_s=settings.phase_timeout_s)
        try:
            self.cluster.build(raytp.models.pretrained(settings.pretrained_path, dtype=settings.dtype),
                               optimizer=None, max_batch=settings.max_batch, max_len=settings.max_len,
                               cuda_graphs=settings.cuda_graphs)
            self.batcher = Batcher(self.cluster)
        except BaseException:
            self.cluster.close()
            raise
        path, vocab = settings.pretrained_path, self.batcher.info["vocab_size"]
        self.service = CompletionService(self.batcher, settings.name, load_tokenizer(path),
                                         eos_ids(path, vocab))

    def _authorize(self, request: Request) -> None:
        if not self._key:
            return
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, b"Bearer " + self._key):
            raise ApiError(401, "a valid API key is needed: 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def _denied(self, request: Request) -> JSONResponse | None:
        """The 401 response to a request without the key; None when it may go on."""
        try:
            self._authorize(request)
        except ApiError as e:
            return _error(e)
        return None

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        try:
            self._authorize(request)
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError) as e:
                raise ApiError(400, f"the request body is not JSON: {e}") from None
            job = self.service.prepare(body)
            if job.request.stream:
                return StreamingResponse(self.service.stream(job), media_type="text/event-stream")
            return JSONResponse(await self.service.complete(job))
        except ApiError as e:
            return _error(e)

    @api.get("/v1/models")
    async def models(self, request: Request):
        if (denied := self._denied(request)) is not None:
            return denied
        return JSONResponse(self.service.models())

    @api.get("/health")
    async def health(self, request: Request):
        if (denied := self._denied(request)) is not None:
            return denied
        if not self.batcher.ready:
            return _error(ApiError(503, "the model's ranks are being rebuilt", retry_after_s=5))
        return JSONResponse({"status": "ok"})

    @api.get("/stats")
    async def stats(self, request: Request):
        if (denied := self._denied(request)) is not None:
            return denied
        return JSONResponse(self.batcher.stats())

    def check_health(self) -> None:
        """Ray Serve's probe: a replica whose batcher thread ended is replaced."""
        if self.batcher.error is not None:
            raise RuntimeError(f"the batcher's thread ended: {self.batcher.error!r}")

    def rank_actors(self) -> list[Any]:
        """The rank actors now (through a deployment handle; for operators and chaos tests)."""
        return list(self.cluster.actors)

    def __del__(self):  # Ray Serve's shutdown hook for a replica
        batcher = getattr(self, "batcher", None)
        if batcher is not None:
            batcher.close()
        if getattr(self, "cluster", None) is not None:
            self.cluster.close()
