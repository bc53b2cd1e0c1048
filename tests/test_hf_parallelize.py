"""``raytp.parallelize(model, mesh, plan="auto")`` on transformers models: Llama with its
shipped plan (fewer key/value heads than ranks at tp=4), GPT-2 (Conv1D, fused c_attn)
and BERT with raytp's plans compute what the unparallelized model does (float32,
1e-5); a size tp does not divide is named."""

import copy
import os

import pytest
import torch

import raytp
from raytp.nn import ColumnParallelLinear, RowParallelLinear

import _dist
from helpers import mesh, world

transformers = pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"
FP32 = {"rtol": 1e-5, "atol": 1e-5}
IDS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
MASK = torch.ones(2, 10, dtype=torch.int64).index_fill_(1, torch.arange(7, 10), 0)  # row padding


def _model(name, **overrides):
    import transformers as tf

    torch.manual_seed(0)
    if name.startswith("llama"):  # "llama-eager": the eager attention, which reads num_key_value_groups
        if name == "llama-eager":
            overrides = {"attn_implementation": "eager", **overrides}
        config = tf.LlamaConfig(**{"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
                                   "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
                                   "initializer_range": 0.2, **overrides})
        return tf.LlamaForCausalLM(config).eval()
    if name == "gpt2":
        config = tf.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                               initializer_range=0.2, bos_token_id=0, eos_token_id=1, **overrides)
        return tf.GPT2LMHeadModel(config).eval()
    config = tf.BertConfig(**{"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "intermediate_size": 64,
                              "max_position_embeddings": 16, "initializer_range": 0.2, **overrides})
    return tf.BertModel(config).eval()


def _outputs(model, name):
    with torch.no_grad():
        if name == "bert":
            return model(input_ids=IDS, attention_mask=MASK).last_hidden_state
        return model(IDS).logits


def _check(name):
    rank, n = world()
    model = _model(name)
    expected = _outputs(copy.deepcopy(model), name)
    raytp.parallelize(model, mesh(n), "auto")
    layers = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))]
    assert len(layers) >= 8  # attention and MLP of both layers are sharded
    torch.testing.assert_close(_outputs(model, name), expected, **FP32)
    return sum(p.numel() for m in layers for p in m.parameters())


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("name", ["llama", "llama-eager", "gpt2", "bert"])
def test_auto_plan_computes_the_same(name, n):
    local_sizes = _dist.run(n, _check, name)
    assert len(set(local_sizes)) == 1


def _errors():
    m = mesh(4)
    with pytest.raises(ValueError, match=r"n_heads=6, n_kv_heads=6, tp=4"):
        raytp.parallelize(_model("llama", num_attention_heads=6, num_key_value_heads=6,
                                 hidden_size=36), m, "auto")
    with pytest.raises(ValueError, match=r"'encoder\.layer\.0\.intermediate\.dense' \(colwise\): "
                                         r"out_features=30 is not divisible by tp=4"):
        raytp.parallelize(_model("bert", intermediate_size=30), m, "auto")
    with pytest.raises(ValueError, match=r"out_features=66 is not divisible by tp=4"):
        raytp.parallelize(_model("llama", vocab_size=66), m, "auto")  # the LM head, gathered
    with pytest.raises(ValueError, match="needs a Hugging Face transformers model"):
        raytp.parallelize(torch.nn.Linear(4, 4), m, "auto")


def test_sizes_tp_does_not_divide_are_named():
    _dist.run(4, _errors)


def test_the_driver_plan_rule_accepts_the_shipped_and_family_plans():
    """check_plan_flow (the driver's "a colwise output must reach a rowwise layer" rule)
    passes Llama's shipped plan and raytp's BERT plan, and refuses Llama's without the
    rowwise down projection."""
    from raytp.models.families import family_of_model_type
    from raytp.models.hf_parallel import raytp_styles, shipped_plan
    from raytp.parallelize import check_plan, check_plan_flow

    llama = _model("llama")
    styles = raytp_styles(shipped_plan(llama))
    check_plan_flow(llama, check_plan(llama, styles))
    bert = _model("bert")
    check_plan_flow(bert, check_plan(bert, dict(family_of_model_type("bert").tp_plan.styles)))
    broken = {k: v for k, v in styles.items() if not k.endswith("down_proj")}
    with pytest.raises(ValueError, match=r"plan: 'model.layers.0.mlp.up_proj' is colwise, so its output is "
                                         r"sharded .* 'model.layers.0.mlp.down_proj' \(Linear\), is not in "
                                         r"the plan"):
        check_plan_flow(llama, check_plan(llama, broken))
