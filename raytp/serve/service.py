"""``CompletionService``: OpenAI completions over a :class:`raytp.driver.serving.Batcher`,
in asyncio, with no web framework (the deployment, :mod:`raytp.serve.deployment`, puts
it behind HTTP).

A request's prompts become token ids (text through the checkpoint's tokenizer), are
checked against the model and the KV cache, and join the running batch; its ids come
back through an asyncio queue as the ranks choose them. A stop string reached, or the
client gone (the coroutine cancelled, the stream closed), cancels the request in the
batch, so that its slot is free at the next decode step. Stop ids and the model's
end-of-sequence ids end a choice with ``finish_reason="stop"`` and are left out of its
text and ``token_ids``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from raytp.driver.serving import Batcher
from raytp.inference import Request, SamplingParams, make_requests
from raytp.serve.protocol import ApiError, CompletionRequest, bad, parse_completion
from raytp.serve.text import CompletionText

POLL_S = 5.0  # how often a waiting request checks that the batcher still runs


@dataclass
class Choice:
    """One prompt of a request: its text so far, its ids, how it ended, and what of them
    no stream chunk carried yet."""

    text: CompletionText
    stop_ids: frozenset[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    pending: str = ""  # text not yet in a chunk
    ids_sent: int = 0

    def take(self) -> tuple[str, list[int]]:
        piece, self.pending = self.pending, ""
        ids, self.ids_sent = self.token_ids[self.ids_sent:], len(self.token_ids)
        return piece, ids


@dataclass
class Job:
    """A checked request ready for the batch: its prompts' ids, sampling and choices."""

    request: CompletionRequest
    prompts: list[tuple[int, ...]]
    requests: list[Request]
    choices: list[Choice]

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.prompts))


class CompletionService:
    """Completions of ``model_name`` through ``batcher``; ``tokenizer`` (None: token-id
    prompts only) and the model's ``eos`` ids, which end a choice as stop ids do."""

    def __init__(self, batcher: Batcher, model_name: str, tokenizer=None, eos: tuple[int, ...] = ()):
        self.batcher, self.model_name, self.tokenizer, self.eos = batcher, model_name, tokenizer, eos

    def models(self) -> dict[str, Any]:
        info = self.batcher.info
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "raytp",
                                            "created": 0, "max_model_len": min(info["max_seq_len"],
                                                                               info["max_len"])}]}

    def prepare(self, body: Any) -> Job:
        """The job of the JSON ``body``, checked through (an ApiError otherwise), before
        any response starts: a bad streamed request gets its 400 too."""
        request = parse_completion(body)
        if request.model is not None and request.model != self.model_name:
            raise ApiError(404, f"the model {request.model!r} does not exist; this server serves "
                                f"{self.model_name!r}", "model", "model_not_found")
        if request.stop and self.tokenizer is None:
            raise bad("stop", "stop strings need the model's tokenizer (no tokenizer.json beside the "
                              "checkpoint): give stop token ids instead")
        prompts = [self._ids(p) for p in request.prompts]
        sampling = self._sampling(request, prompts)
        try:
            requests = make_requests(prompts, sampling, **self._limits())
        except ValueError as e:  # what the checks above missed, in the engine's words
            raise bad("prompt", str(e)) from None
        stops = frozenset(request.stop_ids) | frozenset(self.eos)
        return Job(request, prompts, requests,
                   [Choice(CompletionText(self.tokenizer, request.stop), stops) for _ in prompts])

    async def complete(self, job: Job) -> dict[str, Any]:
        """The whole completion (``stream`` false)."""
        async for _ in self._run(job):
            pass
        return self._body([self._choice(i, c.text.text, c.token_ids, c.finish_reason)
                           for i, c in enumerate(job.choices)], self._usage(job))

    async def stream(self, job: Job) -> AsyncIterator[str]:
        """Server-sent events: a chunk per new piece of a choice, the last with its
        ``finish_reason``, then the usage if asked for, and ``[DONE]``; a failure of the
        ranks ends the stream with an ``error`` event."""
        identity = (f"cmpl-{uuid.uuid4().hex}", int(time.time()))
        try:
            async for i in self._run(job):
                c = job.choices[i]
                piece, ids = c.take()
                if piece or ids or c.finish_reason:
                    yield _event(self._body([self._choice(i, piece, ids, c.finish_reason)], None, identity))
            if job.request.include_usage:
                yield _event(self._body([], self._usage(job), identity))
            yield "data: [DONE]\n\n"
        except ApiError as e:
            yield _event({**e.body(), "status": e.status})

    # -- the request's life in the batch ------------------------------------------------

    async def _run(self, job: Job):
        """Yields the index of the choice each event changed, until every one ended."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            indices = self.batcher.submit(
                job.requests, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        except RuntimeError as e:  # closed: the replica is stopping
            raise ApiError(503, str(e), code="shutting_down", retry_after_s=1) from None
        open_ = set(range(len(job.prompts)))
        try:
            while open_:
                kind, i, value = await self._next(events)
                if i not in open_:
                    continue  # an id decided before its stop string's cancel reached the ranks
                if kind == "error":
                    raise ApiError(503, str(value), code="ranks_failed", retry_after_s=value.retry_after_s)
                choice = job.choices[i]
                if kind == "done":
                    choice.finish_reason = choice.finish_reason or "length"
                else:
                    self._add(choice, value)
                if choice.finish_reason:
                    choice.pending += choice.text.finish()
                    open_.discard(i)
                    if kind == "token" and choice.text.stopped:
                        self.batcher.cancel([indices[i]])  # free its slot now, not at max_tokens
                yield i
        finally:
            self.batcher.cancel([indices[i] for i in open_])  # the client left, or the ranks failed

    def _add(self, choice: Choice, token: int) -> None:
        if token in choice.stop_ids:
            choice.finish_reason = "stop"
            return
        choice.token_ids.append(token)
        choice.pending += choice.text.add(token)
        if choice.text.stopped:
            choice.finish_reason = "stop"

    async def _next(self, events: asyncio.Queue):
        while True:
            try:
                return await asyncio.wait_for(events.get(), POLL_S)
            except asyncio.TimeoutError:
                if self.batcher.error is not None:
                    raise ApiError(500, f"the server's batcher failed: {self.batcher.error!r}") from None

    def _limits(self) -> dict[str, Any]:
        info = self.batcher.info
        return {k: info[k] for k in ("vocab_size", "max_seq_len", "max_len")}

    def _ids(self, prompt) -> tuple[int, ...]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise bad("prompt", "this model has no tokenizer (no tokenizer.json beside the checkpoint): "
                                    "send the prompt as a list of token ids")
            prompt = tuple(self.tokenizer.encode(prompt).ids)
        if not prompt:
            raise bad("prompt", "the prompt is empty: it needs at least one token")
        vocab = self.batcher.info["vocab_size"]
        outside = next((t for t in prompt if not 0 <= t < vocab), None)
        if outside is not None:
            raise bad("prompt", f"the prompt holds token id {outside}, outside the vocabulary [0, {vocab})")
        return prompt

    def _sampling(self, request: CompletionRequest, prompts) -> SamplingParams:
        info = self.batcher.info
        context = min(info["max_seq_len"], info["max_len"])
        longest = max(map(len, prompts))
        if longest + request.max_tokens > context:
            raise bad("max_tokens" if longest < context else "prompt",
                      f"the prompt has {longest} tokens; with max_tokens={request.max_tokens} it needs "
                      f"{longest + request.max_tokens} positions, beyond the model's context of {context}")
        vocab = info["vocab_size"]
        outside = [t for t in request.stop_ids if not 0 <= t < vocab]
        if outside:
            raise bad("stop", f"stop token ids {outside} are outside the vocabulary [0, {vocab})")
        return SamplingParams(request.max_tokens, temperature=request.temperature, top_k=request.top_k,
                              top_p=request.top_p, stop_token_ids=tuple(request.stop_ids) + self.eos,
                              seed=request.seed)

    # -- bodies ---------------------------------------------------------------------------

    def _body(self, choices, usage, identity=None) -> dict[str, Any]:
        cid, created = identity or (f"cmpl-{uuid.uuid4().hex}", int(time.time()))
        body = {"id": cid, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    @staticmethod
    def _choice(index: int, text: str, ids: list[int], finish_reason: str | None) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason,
                "token_ids": list(ids)}

    @staticmethod
    def _usage(job: Job) -> dict[str, int]:
        completion = sum(len(c.token_ids) for c in job.choices)
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
                "total_tokens": job.prompt_tokens + completion}


def _event(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"
