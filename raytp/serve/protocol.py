"""The OpenAI completions request, checked: every field's type and range, the fields
raytp does not support refused by name, and the error bodies OpenAI's clients read.

:func:`parse_completion` turns the JSON body of ``POST /v1/completions`` into a
:class:`CompletionRequest` or raises :class:`ApiError` (an HTTP status and an
OpenAI-style ``{"error": {"message", "type", "param", "code"}}`` body). Beyond OpenAI's
fields it takes vLLM's ``top_k`` and ``stop_token_ids``; ``stop`` may hold token ids
as well as strings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_STOPS = 16


class ApiError(Exception):
    """A request refused: ``status`` (400, 401, 404, 503, ...) and the OpenAI error body."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             500: "internal_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


def bad(field: str | None, message: str) -> ApiError:
    return ApiError(400, message, field)


@dataclass(frozen=True)
class CompletionRequest:
    """A checked completions request: ``prompts`` (each a str or a list of token ids),
    the sampling fields, ``stop`` strings and ``stop_ids`` apart."""

    model: str | None
    prompts: tuple[str | tuple[int, ...], ...]
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    stop: tuple[str, ...]
    stop_ids: tuple[int, ...]
    seed: int | None
    stream: bool
    include_usage: bool


# fields raytp does not support, and the one value of each it accepts (OpenAI's default)
UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "suffix": None,
               "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None}
ACCEPTED_AS_NO = {"suffix": ("",), "logit_bias": ({},)}  # other spellings of "none"
KNOWN = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids",
         "seed", "stream", "stream_options", "user", *UNSUPPORTED}


def parse_completion(body: Any) -> CompletionRequest:
    """The checked request of ``body`` (the decoded JSON); an :class:`ApiError` (400)
    naming the field for anything wrong or unsupported."""
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise bad(unknown[0], f"unknown field {unknown[0]!r} (raytp serves: {', '.join(sorted(KNOWN))})")
    for name, default in UNSUPPORTED.items():
        value = body.get(name, default)
        if value != default and value not in ACCEPTED_AS_NO.get(name, ()) and value is not None:
            raise bad(name, f"{name}={value!r} is not supported by raytp (only {default!r})")
    stops, stop_ids = _stop(body.get("stop"))
    return CompletionRequest(
        model=_typed(body, "model", str, None),
        prompts=_prompts(body),
        max_tokens=_int(body, "max_tokens", DEFAULT_MAX_TOKENS, low=1),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_top_p(body),
        top_k=_top_k(body),
        stop=stops,
        stop_ids=stop_ids + _ids(body.get("stop_token_ids") or [], "stop_token_ids"),
        seed=_int(body, "seed", None),
        stream=_typed(body, "stream", bool, False),
        include_usage=_include_usage(body.get("stream_options")),
    )


def _typed(body, name: str, kind: type, default):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise bad(name, f"{name} must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _int(body, name: str, default, low: int | None = None):
    value = _typed(body, name, int, default)
    if value is not None and low is not None and value < low:
        raise bad(name, f"{name}={value} must be >= {low}")
    return value


def _number(body, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(name, f"{name} must be a number, got {value!r}")
    if not low <= value <= high:
        raise bad(name, f"{name}={value} must be in [{low:g}, {high:g}]")
    return float(value)


def _top_p(body) -> float | None:
    value = _number(body, "top_p", 1.0, 0.0, 1.0)
    if value == 0:
        raise bad("top_p", "top_p=0 must be in (0, 1]")
    return None if value == 1 else value  # 1: the whole distribution, no nucleus to find


def _top_k(body) -> int | None:
    value = _typed(body, "top_k", int, None)
    if value is None or value == -1:  # vLLM's -1: all
        return None
    if value < 1:
        raise bad("top_k", f"top_k={value} must be >= 1 (or -1: all)")
    return value


def _ids(value, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise bad(name, f"{name} must be a list of token ids (integers)")
    return tuple(value)


def _prompts(body) -> tuple[str | tuple[int, ...], ...]:
    """A string, a list of ids, or a batch: a list of strings or of id lists."""
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt", "prompt is required: a string, a list of token ids, or a list of either")
    if isinstance(prompt, str):
        return (prompt,)
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool)
                                                   for p in prompt):
        return (tuple(prompt),)
    if isinstance(prompt, list) and prompt:
        return tuple(p if isinstance(p, str) else _ids(p, "prompt") for p in prompt)
    raise bad("prompt", f"prompt must be a string, a list of token ids, or a non-empty list of either; "
                        f"got {type(prompt).__name__} {prompt!r:.40}")


def _stop(value) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if value is None:
        return (), ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(
            isinstance(s, str) or (isinstance(s, int) and not isinstance(s, bool)) for s in items):
        raise bad("stop", "stop must be a string or a list of strings and token ids")
    if len(items) > MAX_STOPS:
        raise bad("stop", f"stop has {len(items)} entries; at most {MAX_STOPS}")
    if any(s == "" for s in items):
        raise bad("stop", "a stop string must not be empty")
    return tuple(s for s in items if isinstance(s, str)), tuple(s for s in items if isinstance(s, int))


def _include_usage(options) -> bool:
    if options is None:
        return False
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad("stream_options", "stream_options must be an object with only 'include_usage'")
    value = options.get("include_usage", False)
    if not isinstance(value, bool):
        raise bad("stream_options", "stream_options.include_usage must be true or false")
    return value
