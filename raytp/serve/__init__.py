"""Serving a tensor-parallel model through Ray Serve with the OpenAI completions API
(the ``serve`` extra: ``pip install 'raytp[serve]'``).

- :func:`app` is the Ray Serve application: ``serve.run(raytp.serve.app(path, tp=2))``;
- :func:`build_app` is the same for ``serve run raytp.serve:build_app pretrained_path=DIR tp=2``;
- :func:`run` starts Ray Serve on ``host:port`` (127.0.0.1 by default) with it: ``raytp serve DIR``.

One replica owns a TP cluster built for inference; the requests of every client join
its continuous batch (:mod:`raytp.driver.serving`). Routes, errors and authentication:
:mod:`raytp.serve.deployment`; the request's fields: :mod:`raytp.serve.protocol`.
"""

from __future__ import annotations

import os
from typing import Any

from raytp.serve.deployment import CompletionServer, ServeSettings

API_KEY_ENV = "RAYTP_API_KEY"  # where build_app and the CLI read a key from, kept off command lines
INT_ARGS = ("tp", "dp", "max_batch", "max_len")


def app(pretrained_path: str, tp: int = 2, dp: int = 1, max_batch: int | None = None,
        api_key: str | None = None, **options):
    """The Ray Serve application serving the Hugging Face checkpoint at
    ``pretrained_path`` (with its ``tokenizer.json``, when there is one) on ``tp x dp``
    ranks through a KV cache of ``max_batch`` slots; with ``api_key``, every request needs
    ``Authorization: Bearer <api_key>``. ``options``: the other fields of
    :class:`~raytp.serve.deployment.ServeSettings` (``max_len``, ``device``, ``dtype``,
    ``model_name``, ``cuda_graphs``, ``phase_timeout_s``)."""
    settings = ServeSettings(str(pretrained_path), tp=tp, dp=dp, max_batch=max_batch, api_key=api_key,
                             **options)
    return CompletionServer.bind(settings)


def build_app(args: dict[str, Any]):
    """:func:`app` from ``serve run``'s ``key=value`` arguments (strings): ``pretrained_path``
    and any of its other arguments; the key from ``api_key`` or the RAYTP_API_KEY variable."""
    args = dict(args)
    for name in INT_ARGS:
        if name in args:
            args[name] = int(args[name])
    if "cuda_graphs" in args:
        args["cuda_graphs"] = str(args["cuda_graphs"]).lower() not in ("0", "false", "no")
    if "phase_timeout_s" in args:
        args["phase_timeout_s"] = float(args["phase_timeout_s"])
    args.setdefault("api_key", os.environ.get(API_KEY_ENV) or None)
    return app(**args)


def run(application, *, host: str = "127.0.0.1", port: int = 8000, name: str = "raytp",
        blocking: bool = True):
    """Start Ray Serve's HTTP proxy on ``host:port`` and deploy ``application`` at ``/``;
    with ``blocking``, serve until interrupted. Ray is joined or started as ``TPCluster``
    does (:func:`raytp.driver.launch.connect`)."""
    from ray import serve

    from raytp.driver.launch import connect

    connect(None)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(application, name=name, route_prefix="/", blocking=blocking)


__all__ = ["API_KEY_ENV", "CompletionServer", "ServeSettings", "app", "build_app", "run"]
