"""Generation on one GPU (the GPU host, ``pytest -m gpu tests/test_generate_gpu.py``):
the decode steps replayed as CUDA graphs give the eager path's ids, greedy and seeded
sampling, for ragged prompts through fewer slots than prompts (slots refill and
compact, so several batch buckets are captured); an inference build sizes its cache
from the free memory after the weights and reports it."""

import pytest
import torch

import raytp
from raytp.engine import BuildSpec, build_engine
from raytp.inference import SamplingParams, generate
from raytp.models import GPTConfig

import _dist

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]

CONFIG = GPTConfig(vocab_size=1000, n_layers=4, n_heads=8, n_kv_heads=2, d_model=256, d_ff=512,
                   max_seq_len=256,
                   norm="rmsnorm", activation="swiglu", positions="rope", bias=False, tie_embeddings=False,
                   dtype="float32", init_std=0.1)


def _mesh():
    return raytp.DeviceMesh(tp=1, dp=1, device=torch.device("cuda", torch.cuda.current_device()))


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, CONFIG.vocab_size, (n,), generator=g).tolist() for n in range(1, 61, 3)]


def _graphs_and_eager():
    engine = build_engine(_mesh(), BuildSpec(CONFIG, optimizer=None, seed=0, max_batch=8, max_len=128))
    out = {}
    for name, sampling in [("greedy", SamplingParams(24)),
                           ("sampled", SamplingParams(24, temperature=0.8, top_k=50, top_p=0.9, seed=3))]:
        for graphs in (True, False):
            ids = generate(engine.generation, _prompts(), sampling, cuda_graphs=graphs)
            stats = engine.generation.stats
            out[name, graphs] = ids, stats["graph_steps"], stats["decode_steps"]
    return out


def test_cuda_graphs_give_the_eager_ids():
    out = _dist.run(1, _graphs_and_eager, backend="gloo-cuda")[0]
    for name in ("greedy", "sampled"):
        (graphed, graph_steps, steps), (eager, eager_graph_steps, _) = out[name, True], out[name, False]
        assert graphed == eager, name
        assert graph_steps == steps > 0 and eager_graph_steps == 0, name
        assert all(len(ids) == 24 for ids in graphed)


def _sized():
    engine = build_engine(_mesh(), BuildSpec(CONFIG, optimizer=None, seed=0))
    free, _ = torch.cuda.mem_get_info()
    info = engine.generation.describe()
    return info, free


def test_an_inference_build_sizes_its_cache_from_free_memory():
    info, free_after = _dist.run(1, _sized, backend="gloo-cuda")[0]
    assert info["max_len"] == CONFIG.max_seq_len and info["max_batch"] >= 8
    assert info["kv_cache_bytes"] > 0 and free_after > 0
