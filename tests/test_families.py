"""The model-family records (raytp.models.families): each exported family's config
survives Hugging Face and back; each weight-name map names exactly the parameters of
the raytp model its config builds (tied ones aside); and a family registered in a copy
of the registry is detected, loaded, exported and parallelized with no other table."""

import dataclasses

import pytest
import torch

import raytp
from raytp.bench.nullcomm import NullCommunicator
from raytp.checkpoint.files import read_json
from raytp.models import BertConfig, GPTConfig, families, hf_config
from raytp.models.families import FAMILIES, GPT2, Family, export_family_of, family_named, family_of
from raytp.models.hf import from_pretrained
from raytp.models.hf_export import export_hf
from raytp.params import get_spec

# tiny Hugging Face config.json dicts, one per family, with the options raytp computes
HF = {
    "gpt2": {"model_type": "gpt2", "vocab_size": 37, "n_layer": 2, "n_head": 4, "n_embd": 32, "n_inner": 48,
             "n_positions": 16, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5},
    "llama": {"model_type": "llama", "vocab_size": 37, "num_hidden_layers": 2, "num_attention_heads": 8,
              "num_key_value_heads": 2, "hidden_size": 32, "intermediate_size": 48,
              "max_position_embeddings": 16, "rms_norm_eps": 1e-6, "hidden_act": "silu", "rope_theta": 5e5,
              "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": False},
    "bert": {"model_type": "bert", "vocab_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
             "hidden_size": 32, "intermediate_size": 48, "max_position_embeddings": 16, "type_vocab_size": 2,
             "hidden_act": "gelu", "layer_norm_eps": 1e-12},
}
# raytp configs each family must build and name in full (tied, untied, with and without biases)
LLAMA = {"norm": "rmsnorm", "activation": "swiglu", "positions": "rope", "n_heads": 8, "n_kv_heads": 2}
SMALL = {"vocab_size": 37, "n_layers": 2, "d_model": 32, "d_ff": 48, "max_seq_len": 16}
CONFIGS = [("gpt2", GPTConfig(**SMALL, n_heads=4)),
           ("llama", GPTConfig(**SMALL, **LLAMA, bias=False, tie_embeddings=False)),
           ("llama", GPTConfig(**SMALL, **LLAMA, bias=True, tie_embeddings=True)),
           ("bert", BertConfig(**SMALL, n_heads=4))]


def cpu_mesh() -> raytp.DeviceMesh:
    """tp=1 in this process: every collective returns early, so the math is the real one."""
    return raytp.DeviceMesh.from_communicators(NullCommunicator(0, 1, "tp", "cpu"),
                                               NullCommunicator(0, 1, "dp", "cpu"), "cpu")


def test_the_registry_holds_gpt2_llama_and_bert():
    assert [f.name for f in FAMILIES] == ["gpt2", "llama", "bert"]
    assert sorted(HF) == sorted(f.name for f in FAMILIES)  # a new family needs its tiny config here
    for family in FAMILIES:
        assert family_of(HF[family.name]) is family_named(family.name) is family
    with pytest.raises(ValueError, match=r"no model family named 't5'; raytp has \['gpt2', 'llama', 'bert'"):
        family_named("t5")


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_each_exported_family_round_trips_its_config(family):
    hf = HF[family.name]
    config = family.config_cls(**family.config_from_hf(hf))
    exported = family.config_to_hf(config)
    if family.export is None:
        assert exported is None
        return
    assert exported["model_type"] in family.model_types
    assert exported["architectures"] == list(family.export.architectures)
    assert {k: exported.get(k) for k in hf} == hf  # every field read comes back as it was
    assert family_of(exported) is family and export_family_of(config) is family
    assert hf_config.config_from_hf(exported) == config
    assert hf_config.config_to_hf(config) == exported


@pytest.mark.parametrize("config", [c for _, c in CONFIGS if isinstance(c, GPTConfig)], ids=["gpt2", "llama",
                                                                                             "llama-tied-bias"])
def test_exported_gpt_configs_read_back_equal(config):
    assert hf_config.config_from_hf(hf_config.config_to_hf(config), config.dtype) == config


@pytest.mark.parametrize(("name", "config"), CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CONFIGS)])
def test_the_names_map_is_every_parameter_of_the_model(name, config):
    family = family_named(name)
    model = family.model_cls(config, cpu_mesh(), device="cpu", init=False)
    params = dict(model.named_parameters())
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(params)
    names = family.names(config.n_layers, getattr(config, "bias", True))
    assert set(names) - tied == set(params)
    for key, source in names.items():
        if key in params:  # one checkpoint tensor, or one per block of a fused parameter
            spec = get_spec(params[key])
            assert len(source.keys) in (1, len(spec.blocks) if spec is not None else 1), key


def test_a_record_refuses_empty_fields():
    with pytest.raises(ValueError, match=r"model_types=\(\) must be a non-empty tuple"):
        dataclasses.replace(GPT2, model_types=())
    with pytest.raises(ValueError, match=r"probe=''"):
        dataclasses.replace(GPT2, probe="")
    with pytest.raises(ValueError, match=r"raytp exports GPT-2 or Llama checkpoints; the model's config is a "
                                         r"BertConfig"):
        export_family_of(CONFIGS[-1][1])


TOY = dataclasses.replace(GPT2, name="toy", model_types=("toy-gpt2",), description="a toy GPT-2")


@pytest.fixture
def with_toy(monkeypatch):
    """The registry with the toy first (so that it, not GPT-2, exports a GPT-2 config)."""
    monkeypatch.setattr(families, "FAMILIES", (TOY, *FAMILIES))
    return TOY


def test_a_toy_family_in_the_registry_is_detected(with_toy):
    assert isinstance(with_toy, Family)
    assert hf_config.model_family({**HF["gpt2"], "model_type": "toy-gpt2"}) == "toy"
    assert hf_config.config_from_hf({**HF["gpt2"], "model_type": "toy-gpt2"}) == GPTConfig(
        **{**SMALL, "n_heads": 4, "activation": "gelu_tanh"})
    with pytest.raises(ValueError, match=r"raytp loads model_type 'toy-gpt2': a toy GPT-2; 'gpt2'"):
        hf_config.model_family({"model_type": "t5"})
    assert hf_config.export_family(CONFIGS[0][1]) == "toy"


def test_without_its_record_the_toy_is_unknown():
    with pytest.raises(ValueError, match=r"model_type='toy-gpt2' .* is not supported"):
        hf_config.model_family({"model_type": "toy-gpt2"})


def test_a_toy_family_exports_and_loads_back_the_same_model(with_toy, tmp_path):
    config = GPTConfig(**SMALL, n_heads=4, dtype="float64")
    mesh = cpu_mesh()
    torch.manual_seed(0)
    model = config.build(mesh).eval()
    assert export_hf(model, mesh, tmp_path)
    assert hf_config.model_family(read_json(tmp_path / "config.json")) == "toy"
    loaded = from_pretrained(tmp_path, mesh, dtype="float64").eval()
    assert loaded.config == config
    ids = torch.randint(0, 37, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)


def test_a_toy_family_gets_its_tp_plan(with_toy):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=37, n_positions=16, n_embd=32, n_layer=2, n_head=4)).eval()
    ids = torch.randint(0, 37, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    model.config.model_type = "toy-gpt2"
    raytp.parallelize(model, cpu_mesh(), "auto")
    assert isinstance(model.transformer.h[0].attn.c_attn, raytp.nn.ColumnParallelLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_family_without_a_tp_plan_is_named(monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(families, "FAMILIES", (dataclasses.replace(GPT2, tp_plan=None), *FAMILIES[1:]))
    config = transformers.GPT2Config(vocab_size=37, n_positions=16, n_embd=32, n_layer=1, n_head=4)
    model = transformers.GPT2LMHeadModel(config)
    with pytest.raises(ValueError, match=r"\(model_type='gpt2'\) ships no TP plan .* raytp's own plans cover "
                                         r"'bert'$"):
        raytp.parallelize(model, cpu_mesh(), "auto")
