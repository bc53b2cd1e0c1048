"""Load on ``raytp serve``: CLIENTS concurrent clients (the official ``openai`` client,
asyncio) send REQUESTS completions each, token-id prompts of random lengths and random
``max_tokens``, greedy; prints p50 / p99 latency, total new tokens per second, and the
mean number of active slots per decode step (the server's ``/stats``), so that one can
see the requests shared the batch.

    python scripts/serve_load.py                    # a tiny random Llama, served here on CPU, tp=2
    python scripts/serve_load.py --url http://127.0.0.1:8000 --model NAME   # a running server

Without ``--url`` it saves a tiny random Llama (vocabulary 320, 2 layers, d_model 32) to
a temporary directory, starts Ray Serve on loopback with ``raytp.serve.app`` and runs
the load against it. The API key, if any, comes from RAYTP_API_KEY.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
import urllib.request


def tiny_llama(path: str, vocab: int = 320) -> None:
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, initializer_range=0.5,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def stats(url: str, key: str | None) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    request = urllib.request.Request(f"{url}/stats", headers=headers)
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


async def load(url: str, model: str, key: str | None, clients: int, requests: int, max_tokens: int,
               vocab: int, seed: int) -> tuple[list[float], int, float]:
    import random

    import openai

    rng = random.Random(seed)
    work = [[([rng.randrange(vocab) for _ in range(rng.randint(1, 24))], rng.randint(1, max_tokens))
             for _ in range(requests)] for _ in range(clients)]
    latencies: list[float] = []
    tokens = 0

    async def client(jobs):
        nonlocal tokens
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key or "none", max_retries=0,
                                      timeout=300) as api:
            for prompt, n in jobs:
                t0 = time.perf_counter()
                out = await api.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0)
                latencies.append(time.perf_counter() - t0)
                tokens += out.usage.completion_tokens

    started = time.perf_counter()
    await asyncio.gather(*(client(jobs) for jobs in work))
    return latencies, tokens, time.perf_counter() - started


def report(latencies, tokens, wall, before, after, args) -> None:
    q = statistics.quantiles(latencies, n=100)
    steps = after["decode_steps"] - before["decode_steps"]
    slots = (after["active_slot_steps"] - before["active_slot_steps"]) / max(steps, 1)
    print(f"{args.clients} clients x {args.requests} requests (max_tokens 1..{args.max_tokens}), "
          f"{len(latencies)} completed in {wall:.1f}s")
    print(f"latency p50 {q[49] * 1e3:.0f} ms, p99 {q[98] * 1e3:.0f} ms; {tokens} new tokens, "
          f"{tokens / wall:.0f} tokens/s; {steps} decode steps, {slots:.1f} mean active slots per step")
    busy = sum(after[k] - before[k] for k in ("decode_s", "prefill_s"))
    print(f"rank 0 decoding and prefilling: {busy:.1f}s of the {wall:.1f}s "
          f"({after['prefills'] - before['prefills']} prefills)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server (default: start one here)")
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--vocab", type=int, default=320, help="prompt ids are drawn below this")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    key = os.environ.get("RAYTP_API_KEY") or None
    url = args.url
    if url is None:
        import raytp.serve

        path = os.path.join(tempfile.mkdtemp(), args.model)
        tiny_llama(path, args.vocab)
        raytp.serve.run(raytp.serve.app(path, tp=args.tp, max_batch=args.max_batch, max_len=256, device="cpu",
                                        api_key=key, model_name=args.model), port=args.port, blocking=False)
        url = f"http://127.0.0.1:{args.port}"
    before = stats(url, key)
    latencies, tokens, wall = asyncio.run(load(url, args.model, key, args.clients, args.requests,
                                               args.max_tokens, args.vocab, args.seed))
    report(latencies, tokens, wall, before, stats(url, key), args)
    if args.url is None:
        from ray import serve

        serve.shutdown()


if __name__ == "__main__":
    main()
