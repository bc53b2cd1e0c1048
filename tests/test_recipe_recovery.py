"""The training recipe survives a rank failure: with mixed precision, two micro-batches,
a warmup-cosine schedule, activation checkpointing and weight-decay groups on, a rank
killed mid-run is rebuilt from the last checkpoint and the run's losses and learning
rates are those of an uninterrupted one."""

import os
from pathlib import Path

import numpy as np
import pytest

import raytp
from raytp.models import GPTConfig
from raytp.schedules import WarmupCosine

pytest.importorskip("ray")

STEPS, EVERY = 8, 3
CONFIG = GPTConfig(vocab_size=61, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, d_ff=64, max_seq_len=16,
                   norm="rmsnorm", activation="swiglu", positions="rope", tie_embeddings=False, bias=False,
                   dropout=0.1)
OPTIONS = {"optimizer": raytp.AdamW(lr=3e-3, weight_decay=0.1), "max_grad_norm": 1.0,
           "precision": raytp.MixedPrecision("bfloat16", "float32", "float32"), "micro_batches": 2,
           "lr_schedule": WarmupCosine(warmup_steps=2, total_steps=STEPS, min_lr_ratio=0.1),
           "activation_checkpointing": "full"}


def _batches():
    rng = np.random.default_rng(0)
    return [{"input_ids": rng.integers(0, CONFIG.vocab_size, (4, CONFIG.max_seq_len))} for _ in range(STEPS)]


def dying_loss(marker: str, at_call: int):
    """GPT's own loss, except that rank 1 ends its process at its ``at_call``-th call (once:
    ``marker`` is written first, so the rebuilt rank does not die again)."""
    calls = []

    def loss_fn(model, batch):
        import torch.distributed as dist

        calls.append(1)
        if dist.get_rank() == 1 and len(calls) == at_call and not Path(marker).exists():
            Path(marker).write_text("fired")
            os._exit(1)
        return model.loss(batch)

    return loss_fn


def _fit(tmp_path, name, at_call):
    with raytp.TPCluster(tp=2, device="cpu", max_failures=1, checkpoint_dir=str(tmp_path / name),
                         checkpoint_every=EVERY) as cluster:
        cluster.build(CONFIG, loss_fn=dying_loss(str(tmp_path / f"{name}.fired"), at_call), seed=0, **OPTIONS)
        history = cluster.fit(_batches(), progress=False)
        return history, list(cluster.failures)


def test_a_killed_rank_recovers_with_the_recipe_on(ray_local, tmp_path):
    clean, no_failures = _fit(tmp_path, "clean", at_call=10**9)
    # call 11 of rank 1: the first micro-batch of step 5 (two calls per step), after the
    # first checkpoint (step-00000003: steps 0 to 2); steps 3 to 5 are replayed
    killed, failures = _fit(tmp_path, "killed", at_call=11)
    assert no_failures == [] and len(failures) == 1 and failures[0]["recovered"], failures
    assert failures[0]["resumed_at"] == 3, failures  # from step-00000003, not from the start
    assert [h["step"] for h in killed] == [h["step"] for h in clean] == list(range(STEPS))
    for key in ("loss", "lr", "grad_norm"):
        np.testing.assert_allclose([h[key] for h in killed], [h[key] for h in clean], rtol=1e-12, err_msg=key)
    assert len({round(h["lr"], 12) for h in clean}) > 4  # the schedule moved
