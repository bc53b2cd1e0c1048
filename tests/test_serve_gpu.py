"""raytp.serve on two GPUs, the decode step as CUDA graphs: requests of concurrent
clients that join and leave the running batch (its graph buckets change under them)
get the ids ``cluster.generate`` gives. GPU host only."""

import asyncio

import pytest
import torch

import raytp
from raytp.inference import SamplingParams
from raytp.models import pretrained

pytestmark = pytest.mark.gpu
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
pytest.importorskip("tokenizers")
pytest.importorskip("transformers")  # test_serve._save_llama writes the checkpoint
if torch.cuda.device_count() < 2:
    pytest.skip("needs 2 CUDA GPUs", allow_module_level=True)

from test_serve import KEY, NAME, _free_port, _save_llama, _strip, _tokenizer  # noqa: E402

import raytp.serve  # noqa: E402

CLIENTS, NEW = 48, 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve-gpu") / NAME
    tok = _tokenizer()
    eos = tok.token_to_id("<eos>")
    _save_llama(path, tok, 64, 128, eos_token_id=eos)
    return str(path), eos


def test_concurrent_requests_through_cuda_graphs(ray_local, checkpoint):
    path, eos = checkpoint
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 300, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g).tolist()
               for _ in range(CLIENTS)]
    with raytp.TPCluster(tp=2, device="cuda") as cluster:
        cluster.build(pretrained(path, dtype="float64"), optimizer=None, max_batch=16, max_len=256)
        expect = cluster.generate(prompts, SamplingParams(NEW, stop_token_ids=(eos,)))
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(raytp.serve.app(path, tp=2, max_batch=16, max_len=256, device="cuda", dtype="float64",
                                  api_key=KEY, model_name=NAME), name="raytp-gpu", route_prefix="/")

        async def ask(api, prompt):
            out = await api.completions.create(model=NAME, prompt=prompt, max_tokens=NEW, temperature=0)
            return out.choices[0].token_ids

        async def everyone():
            async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY,
                                          max_retries=0, timeout=120) as api:
                return await asyncio.gather(*(ask(api, p) for p in prompts))

        got = asyncio.run(everyone())
        assert got == [_strip(e, eos) for e in expect]
    finally:
        serve.shutdown()
