"""raytp.serve through the official ``openai`` client on loopback, against
``cluster.generate`` on the same checkpoint (a tiny Llama saved with
``save_pretrained`` and a byte-level BPE tokenizer trained here with ``tokenizers``, in
float64 so that batching cannot flip an argmax): completions of text and of token ids,
batches of prompts, streams, stop strings (whose request leaves the batch at once),
seeded sampling, bad requests, the API key, 64 concurrent clients sharing the batch,
and a rank killed under a stream (its error event, the rebuild, nothing left after
shutdown). One deployment for the module; the references come from a TPCluster closed
before the deployment starts."""

import asyncio
import os
import signal
import socket
import statistics
import threading
import time

import pytest
import ray
import torch

import raytp
from raytp.inference import SamplingParams
from raytp.models import pretrained

serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")  # the HTTP client the openai package uses
tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

import raytp.serve  # noqa: E402  (the serve extra, checked just above)

KEY = "sk-raytp-test-0123456789"
NAME = "tiny-llama"
MAX = 12  # max_tokens of the short requests
LONG = 200  # of the long ones (the context is 256)
WORDS = ("the cat sat on a mat and the dog ran to the red barn while birds sang over green "  # noqa: SIM905
         "hills near a quiet river where old boats rest").split()
TEXTS = ["the cat sat", "a dog ran to the", "birds sang over green hills", "old boats"]
CLIENTS, REQUESTS = 64, 4


def _corpus():
    g = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=g).tolist())
            for _ in range(300)]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    return tok


def _load_prompts(vocab):
    """Per client and request: (token ids, max_tokens), random lengths."""
    g = torch.Generator().manual_seed(1)
    return [[(torch.randint(1, vocab, (int(torch.randint(1, 24, (1,), generator=g)),), generator=g).tolist(),
              int(torch.randint(1, MAX + 1, (1,), generator=g))) for _ in range(REQUESTS)]
            for _ in range(CLIENTS)]


def _save_llama(path, tok, hidden_size: int, intermediate_size: int, **token_ids) -> None:
    """A tiny seeded Llama with ``tok``'s vocabulary saved at ``path``, ``tok`` beside it."""
    config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden_size,
                                      intermediate_size=intermediate_size, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, initializer_range=0.5,
                                      tie_word_embeddings=False, **token_ids)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))


def tiny_llama(directory):
    """The tiny Llama and its tokenizer saved in ``directory / NAME``: (path, tokenizer, eos id)."""
    path = directory / NAME
    tok = _tokenizer()
    eos = tok.token_to_id("<eos>")
    _save_llama(path, tok, 32, 48, bos_token_id=eos, eos_token_id=eos)
    return str(path), tok, eos


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def reference(ray_local, model):
    """``cluster.generate`` of every prompt the tests send (stop id: the checkpoint's EOS)."""
    path, tok, eos = model
    texts = [tok.encode(t).ids for t in TEXTS]
    load = [ids for client in _load_prompts(tok.get_vocab_size()) for ids, _ in client]
    with raytp.TPCluster(tp=2, device="cpu") as cluster:
        cluster.build(pretrained(path, dtype="float64"), optimizer=None, max_batch=16, max_len=256)
        greedy = SamplingParams(MAX, stop_token_ids=(eos,))
        out = {"text": cluster.generate(texts, greedy), "load": cluster.generate(load, greedy),
               "long": cluster.generate(texts, SamplingParams(LONG, stop_token_ids=(eos,)))}
        out["seeded"] = cluster.generate(texts[:1], SamplingParams(MAX, temperature=1.0, top_p=0.9, seed=7,
                                                                   stop_token_ids=(eos,)))[0]
    out["long_at"] = next(i for i, ids in enumerate(out["long"]) if eos not in ids)  # runs to LONG
    return out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model, reference):
    path = model[0]
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(raytp.serve.app(path, tp=2, max_batch=32, api_key=KEY, max_len=256, device="cpu",
                              dtype="float64", model_name=NAME), name="raytp", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def _strip(ids, eos):
    """What the server returns of generate's ids: without the stop id that ends them."""
    return ids[:-1] if ids and ids[-1] == eos else ids


def _stats(server):
    return httpx.get(f"{server}/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()


def test_completions_of_text_equal_cluster_generate(model, reference, client):
    _, tok, eos = model
    out = client.completions.create(model=NAME, prompt=TEXTS, max_tokens=MAX, temperature=0)
    assert [c.index for c in out.choices] == list(range(len(TEXTS)))
    for choice, ids in zip(out.choices, reference["text"], strict=True):
        assert choice.token_ids == _strip(ids, eos)
        assert choice.text == tok.decode(_strip(ids, eos)) and choice.text
        assert choice.finish_reason == ("stop" if ids[-1] == eos else "length")
    assert out.usage.completion_tokens == sum(len(_strip(ids, eos)) for ids in reference["text"])
    assert out.usage.prompt_tokens == sum(len(tok.encode(t).ids) for t in TEXTS)
    assert [m.id for m in client.models.list().data] == [NAME]


def test_a_streamed_completion_equals_cluster_generate(model, reference, client):
    _, tok, eos = model
    chunks = list(client.completions.create(model=NAME, prompt=TEXTS[1], max_tokens=MAX, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    ids = _strip(reference["text"][1], eos)
    pieces = [c.choices[0] for c in chunks if c.choices]
    assert len(pieces) > 1 and "".join(p.text for p in pieces) == tok.decode(ids)
    assert [t for p in pieces for t in p.token_ids] == ids
    assert [p.finish_reason for p in pieces][-1] in ("stop", "length")
    assert all(p.finish_reason is None for p in pieces[:-1])
    assert chunks[-1].usage.completion_tokens == len(ids)


def test_stop_strings_cut_the_text_and_free_the_slot(model, reference, server, client):
    _, tok, eos = model
    i = reference["long_at"]
    text = tok.decode(reference["long"][i])
    stop = text[5:8]  # reached early; the request would otherwise run LONG ids
    before = _stats(server)["decode_steps"]
    for stream in (False, True):
        out = client.completions.create(model=NAME, prompt=TEXTS[i], max_tokens=LONG, temperature=0,
                                        stop=["never-seen", stop], stream=stream)
        choices = [c.choices[0] for c in out] if stream else out.choices
        assert "".join(c.text for c in choices) == text[:text.find(stop)]
        assert choices[-1].finish_reason == "stop"
    steps = _stats(server)["decode_steps"] - before
    assert steps < LONG, f"{steps} decode steps for two requests stopped after a few ids"
    ids = reference["long"][i]
    by_id = client.completions.create(model=NAME, prompt=TEXTS[i], max_tokens=LONG, temperature=0,
                                      stop=[ids[4]])  # a stop id: the ids before its first place
    assert by_id.choices[0].token_ids == ids[:ids.index(ids[4])] and by_id.choices[0].finish_reason == "stop"


def test_a_client_that_leaves_frees_its_slot(reference, server, client):
    before = _stats(server)["decode_steps"]
    stream = client.completions.create(model=NAME, prompt=TEXTS[reference["long_at"]], max_tokens=LONG,
                                       temperature=0, stream=True)
    assert next(iter(stream)).choices[0].token_ids
    stream.close()  # the client leaves after its first chunk
    deadline = time.monotonic() + 30
    while _stats(server)["live"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = _stats(server)
    assert stats["live"] == 0 and stats["decode_steps"] - before < LONG, stats


def test_seeded_sampling_repeats_cluster_generate(model, reference, client):
    _, _, eos = model
    ask = dict(model=NAME, prompt=TEXTS[0], max_tokens=MAX, temperature=1.0, top_p=0.9)
    first = client.completions.create(seed=7, **ask).choices[0].token_ids
    assert first == _strip(reference["seeded"], eos)
    assert client.completions.create(seed=7, **ask).choices[0].token_ids == first
    assert client.completions.create(seed=8, **ask).choices[0].token_ids != first


def test_token_id_prompts(model, reference, client):
    _, tok, eos = model
    ids = [tok.encode(t).ids for t in TEXTS[:2]]
    one = client.completions.create(model=NAME, prompt=ids[0], max_tokens=MAX, temperature=0)
    assert one.choices[0].token_ids == _strip(reference["text"][0], eos)
    both = client.completions.create(model=NAME, prompt=ids, max_tokens=MAX, temperature=0)
    assert [c.token_ids for c in both.choices] == [_strip(r, eos) for r in reference["text"][:2]]


@pytest.mark.parametrize("body, status, message", [
    ({"max_tokens": 0}, 400, "max_tokens=0 must be >= 1"),
    ({"temperature": "hot"}, 400, "temperature must be a number"),
    ({"n": 2}, 400, "n=2 is not supported"),
    ({"echo": True}, 400, "echo=True is not supported"),
    ({"logprobs": 2}, 400, "logprobs=2 is not supported"),
    ({"best_of": 3}, 400, "best_of=3 is not supported"),
    ({"suffix": "x"}, 400, "suffix='x' is not supported"),
    ({"colour": "red"}, 400, "unknown field 'colour'"),
    ({"prompt": [1, 2, 100000]}, 400, "token id 100000, outside the vocabulary"),
    ({"prompt": "the " * 200, "max_tokens": 100}, 400, "beyond the model's context of 256"),
    ({"prompt": []}, 400, "prompt must be a string, a list of token ids"),
    ({"stop": [""]}, 400, "a stop string must not be empty"),
    ({"model": "gpt-4"}, 404, "the model 'gpt-4' does not exist"),
])
def test_bad_requests_get_openai_errors(server, client, body, status, message):
    request = {"model": NAME, "prompt": "the cat", "max_tokens": 2} | body
    r = httpx.post(f"{server}/v1/completions", json=request, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"]
    assert client.completions.create(model=NAME, prompt="the cat", max_tokens=2).choices[0].text is not None


def test_not_json_gets_400(server):
    r = httpx.post(f"{server}/v1/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]


def test_the_api_key_is_needed(server):
    body = {"model": NAME, "prompt": "the cat", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{server}/v1/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
        assert httpx.get(f"{server}/health", headers=headers, timeout=30).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0).models.list()
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{server}/v1/completions", json=body, headers=auth, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert httpx.get(f"{server}/health", headers=auth, timeout=30).json() == {"status": "ok"}


def test_concurrent_clients_share_the_batch(model, reference, server):
    _, _, eos = model
    prompts = _load_prompts(model[1].get_vocab_size())
    # greedy ids of max_tokens=n are the first n of max_tokens=MAX (up to the stop id)
    expected = [[_cut(ids, n, eos) for (_, n), ids in zip(client_prompts, chunk, strict=True)]
                for client_prompts, chunk in zip(prompts, _chunks(reference["load"], REQUESTS), strict=True)]
    before = _stats(server)
    latencies, results, started = [], [], time.perf_counter()

    async def one_client(k):
        api = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)
        async with api:
            for ids, n in prompts[k]:
                t0 = time.perf_counter()
                out = await api.completions.create(model=NAME, prompt=ids, max_tokens=n, temperature=0)
                latencies.append(time.perf_counter() - t0)
                results.append((k, ids, out.choices[0].token_ids))

    async def everyone():
        await asyncio.gather(*(one_client(k) for k in range(CLIENTS)))

    asyncio.run(everyone())
    wall = time.perf_counter() - started
    got = {(k, tuple(ids)): out for k, ids, out in results}
    assert len(results) == CLIENTS * REQUESTS
    for k in range(CLIENTS):
        for (ids, _), want in zip(prompts[k], expected[k], strict=True):
            assert got[(k, tuple(ids))] == want
    after = _stats(server)
    steps = after["decode_steps"] - before["decode_steps"]
    slots = (after["active_slot_steps"] - before["active_slot_steps"]) / steps
    tokens = after["tokens"] - before["tokens"]
    q = statistics.quantiles(latencies, n=100)
    print(f"\n{CLIENTS}x{REQUESTS} requests: p50 {q[49] * 1e3:.0f} ms, p99 {q[98] * 1e3:.0f} ms, "
          f"{tokens / wall:.0f} tokens/s, {slots:.1f} mean active slots per decode step, {steps} steps")
    assert slots > 8, f"the batch was not shared: {slots:.1f} active slots per decode step"


def _cut(ids, n, eos):
    ids = ids[:n]
    return _strip(ids[:ids.index(eos) + 1] if eos in ids else ids, eos)


def _chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def _pid(actor):
    return os.getpid()


def test_a_rank_killed_under_a_stream(model, reference, server, client):
    """Last in the module: it ends the deployment and checks nothing is left."""
    _, tok, eos = model
    handle = serve.get_app_handle("raytp")
    ranks = handle.rank_actors.remote().result()
    pid = ray.get(ranks[1].execute.remote(_pid))
    i = reference["long_at"]
    blocking = {}

    def whole():
        blocking["response"] = httpx.post(f"{server}/v1/completions", timeout=120, headers={
            "Authorization": f"Bearer {KEY}"}, json={"model": NAME, "prompt": TEXTS[i], "max_tokens": LONG,
                                                      "temperature": 0})
    thread = threading.Thread(target=whole)
    thread.start()
    deadline = time.monotonic() + 30
    while not _stats(server)["live"] and time.monotonic() < deadline:  # in the batch, decoding
        time.sleep(0.01)
    stream = client.completions.create(model=NAME, prompt=TEXTS[i], max_tokens=LONG, temperature=0,
                                       stream=True)
    chunks = iter(stream)
    first = next(chunks)
    assert first.choices[0].token_ids
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(openai.APIError, match="ranks failed"):
        for _ in chunks:
            pass
    thread.join(60)
    r = blocking["response"]
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1, r.text
    assert r.json()["error"]["code"] == "ranks_failed"
    out = client.completions.create(model=NAME, prompt=TEXTS[0], max_tokens=MAX, temperature=0)
    assert out.choices[0].token_ids == _strip(reference["text"][0], eos)  # after the rebuild
    assert _stats(server)["rebuilds"] == 1
    ranks += handle.rank_actors.remote().result()
    serve.delete("raytp")
    deadline = time.monotonic() + 30
    while any(_alive(a) for a in ranks) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(_alive(a) for a in ranks)
    left = [pg for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"]
    assert not left, left


def _alive(actor) -> bool:
    try:
        ray.get(actor.execute.remote(_pid), timeout=5)
        return True
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False
