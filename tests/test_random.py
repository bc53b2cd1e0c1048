"""TP-aware dropout: masks match across ranks where the tensor is replicated, differ
where it is sharded, and come back the same from the same seed."""

import pytest
import torch
import torch.nn.functional as F

from raytp.models import GPT, GPTConfig
from raytp.random import RNGTracker, TPDropout

import _dist
from helpers import mesh, world

SMALL = {"vocab_size": 37, "n_layers": 2, "n_heads": 4, "d_model": 32, "d_ff": 48, "max_seq_len": 16,
         "dtype": "float64", "dropout": 0.3}


def _mask(rng, region):
    with rng.fork(region):
        return F.dropout(torch.ones(256), 0.5) == 0


def _tracker_masks(seed):
    rank, n = world()
    rng = RNGTracker(seed, rank)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    masks = {region: [_mask(rng, region), _mask(rng, region)] for region in ("replicated", "sharded")}
    assert torch.equal(torch.get_rng_state(), before)  # forks leave the default generator alone
    other = RNGTracker(seed + 1, rank)  # a second model's tracker does not disturb the first
    _mask(other, "sharded")
    masks["third"] = _mask(rng, "sharded")
    return masks


def test_tracker_regions():
    ranks = _dist.run(4, _tracker_masks, 7)
    again = _dist.run(4, _tracker_masks, 7)
    reseeded = _dist.run(4, _tracker_masks, 8)
    for r in range(4):
        for region in ("replicated", "sharded"):
            first, second = ranks[r][region]
            assert not torch.equal(first, second)  # the state moves on between forks
            assert torch.equal(first, again[r][region][0])  # reproducible from the seed
            assert not torch.equal(first, reseeded[r][region][0])
        assert not torch.equal(ranks[r]["third"], ranks[r]["sharded"][1])
        assert torch.equal(ranks[r]["third"], again[r]["third"])
    for r in range(1, 4):
        assert torch.equal(ranks[r]["replicated"][0], ranks[0]["replicated"][0])  # same on every rank
        assert not torch.equal(ranks[r]["sharded"][0], ranks[0]["sharded"][0])  # a mask per rank


def _model_dropout(sp, dropout_seed):
    """Forks per region in one training forward, the embedding-dropout mask of this rank,
    the residual stream before the final norm, and the loss."""
    rank, n = world()
    torch.manual_seed(0)
    config = GPTConfig(**SMALL, sequence_parallel=sp)
    model = config.build(mesh(n)) if dropout_seed is None else GPT(config, mesh(n), dropout_seed=dropout_seed)
    forks, seen = [], {}
    fork = model.rng.fork
    model.rng.fork = lambda region: (forks.append(region), fork(region))[1]
    # the first (training) forward's; a hook returning a value would replace the output
    model.embed_dropout.register_forward_hook(
        lambda mod, inp, out: None if "mask" in seen else seen.update(mask=out == 0))
    model.norm.register_forward_pre_hook(
        lambda mod, inp: None if "residual" in seen else seen.update(residual=inp[0].detach()))
    ids = torch.randint(0, 37, (2, 8), generator=torch.Generator().manual_seed(3))
    loss = model.loss({"input_ids": ids})
    model.eval()
    eval_loss = model.loss({"input_ids": ids})
    return forks, seen["mask"], seen["residual"], loss.detach(), eval_loss.detach()


@pytest.mark.parametrize("sp", [False, True], ids=["replicated", "sp"])
def test_model_dropout_regions(sp):
    results = _dist.run(2, _model_dropout, sp, None)
    forks, mask, residual, loss, eval_loss = results[0]
    stream = "sharded" if sp else "replicated"  # the residual stream and the embedding output
    # the embedding, then per block: attention probabilities and two residual branches
    assert forks == [stream] + ["sharded", stream, stream] * SMALL["n_layers"]
    assert mask.float().mean() == pytest.approx(0.3, abs=0.1)
    other = results[1]
    if sp:  # each rank's chunk of the sequence draws its own mask
        assert not torch.equal(mask, other[1])
    else:  # the replicas stay equal
        assert torch.equal(mask, other[1])
        assert torch.equal(residual, other[2])
    assert torch.equal(loss, other[3])
    assert not torch.allclose(loss, eval_loss)  # dropout did something
    again = _dist.run(2, _model_dropout, sp, None)[0]
    assert torch.equal(again[3], loss)  # reproducible from torch's seed
    reseeded = _dist.run(2, _model_dropout, sp, 99)[0]
    assert not torch.equal(reseeded[3], loss)
    assert torch.equal(reseeded[4], eval_loss)  # same weights: the dropout seed does not change them


def test_dropout_arguments():
    with pytest.raises(ValueError, match=r"dropout p=1.0 must be in \[0, 1\)"):
        TPDropout(1.0, None, "replicated")
    with pytest.raises(ValueError, match="dropout > 0 needs an RNGTracker"):
        TPDropout(0.1, None, "replicated")
    with pytest.raises(ValueError, match="region='tp' is not one of"):
        TPDropout(0.1, RNGTracker(0, 0), "tp")
    with pytest.raises(ValueError, match="region='tp' is not one of"), RNGTracker(0, 0).fork("tp"):
        pass
