"""The decoder adapter Protocol and the decoder family registry: both shipped adapters implement
every member with the Protocol's signatures; the schema, LoRA and the captioner read the registry
(a family registered here, in a test, builds, trains one step, decodes and saves through them)."""

from __future__ import annotations

import inspect
import typing

import pytest
import torch

from mmexit_testing import one_torch_thread
from mmexit.errors import ModelLoadError, RecipeError
from mmexit.inference.search import greedy_decode
from mmexit.inference.stepper import CachedStepper
from mmexit.models.adapters.decoder_protocol import DecoderAdapter
from mmexit.models.adapters.decoders import DECODER_FAMILIES, DEFAULT_DECODER, DecoderFamily, decoder_adapter
from mmexit.models.adapters.gpt2 import GPT2DecoderAdapter, build_gpt2_decoder
from mmexit.models.adapters.llama import LlamaDecoderAdapter
from mmexit.models.captioner import build_captioner, load_captioner, save_captioner
from mmexit.models.kv_cache import KV_POLICIES, PROPAGATE
from mmexit.models.lora import add_lora, check_lora, is_lora_parameter
from mmexit.tasks.caption_schema import CAPTIONING_SCHEMA, LORA_SCHEMA

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)
DECODER_CONFIGS = {
    "gpt2": {"n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": 16},
    "llama": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 32},
}


def spec(kind: str, config: dict | None = None) -> dict:
    return {"encoder": {"type": "timm", "name": "vit_tiny_patch16_224",
                        "kwargs": {"img_size": 32, "patch_size": 16, "embed_dim": 16, "depth": 1, "num_heads": 2}},
            "decoder": {"type": kind, "config": config or DECODER_CONFIGS[kind]},
            "vocab_size": 20, "special_ids": {"bos": 1, "eos": 2, "pad": 0}, "exits": "all"}


# ------------------------------------------------------------------ the Protocol
def protocol_members() -> dict[str, str]:
    """name -> "attribute" / "property" / "method" for every member of ``DecoderAdapter``."""
    members = {name: "attribute" for name in DecoderAdapter.__annotations__}
    for name, value in vars(DecoderAdapter).items():
        if isinstance(value, property):
            members[name] = "property"
        elif inspect.isfunction(value) and (not name.startswith("_") or name == "__init__"):
            members[name] = "method"
    return members


def _covers(declared, implemented) -> bool:
    """The implementation's return type is the declared one, or one member of a declared union."""
    return implemented == declared or implemented in typing.get_args(declared)


@pytest.mark.parametrize("adapter_class", [GPT2DecoderAdapter, LlamaDecoderAdapter])
def test_both_adapters_implement_every_member_with_the_protocols_signature(adapter_class):
    members = protocol_members()
    assert {"step", "step_rows", "span", "chunk", "project_kv", "prefill", "num_layers", "num_kv_heads"} <= set(members)
    assert DecoderAdapter in adapter_class.__mro__  # declared conformance
    for name, kind in members.items():
        if kind == "attribute":
            continue  # set in __init__: checked on an instance below
        owner = next(klass for klass in adapter_class.__mro__ if name in vars(klass))
        assert owner is adapter_class, f"{adapter_class.__name__}.{name} is not implemented (inherits {owner})"
        if kind == "property":
            assert isinstance(vars(adapter_class)[name], property), name
            continue
        declared, implemented = getattr(DecoderAdapter, name), getattr(adapter_class, name)
        want, got = inspect.signature(declared), inspect.signature(implemented)
        assert [(p.name, p.kind, p.default) for p in got.parameters.values()] == \
               [(p.name, p.kind, p.default) for p in want.parameters.values()], name
        want_hints, got_hints = typing.get_type_hints(declared), typing.get_type_hints(implemented)
        returns = want_hints.pop("return"), got_hints.pop("return")
        assert got_hints == want_hints, name
        assert _covers(*returns), (name, returns)


@pytest.mark.parametrize("kind", list(DECODER_FAMILIES))
def test_an_adapter_of_every_family_is_a_runtime_decoder_adapter(kind):
    torch.manual_seed(0)
    model = build_captioner(spec(kind))
    adapter = model.adapter
    assert isinstance(adapter, DECODER_FAMILIES[kind].adapter) and isinstance(adapter, DecoderAdapter)
    for name, member in protocol_members().items():
        assert member != "attribute" or hasattr(adapter, name), name
    assert isinstance(adapter.decoder.lm_head, torch.nn.Linear)
    assert adapter.num_layers == 2 and adapter.num_heads % adapter.num_kv_heads == 0


def test_an_object_missing_a_member_is_no_decoder_adapter():
    assert not isinstance(object(), DecoderAdapter)


# ------------------------------------------------------------------ the registry
def test_the_schema_lora_and_policies_derive_from_one_table_each():
    decoder = CAPTIONING_SCHEMA["model"]["decoder"]
    assert decoder["type"].choices == tuple(DECODER_FAMILIES) and decoder["type"].default == DEFAULT_DECODER
    for name, family in DECODER_FAMILIES.items():
        assert f"{name}: {family.doc}" in decoder["type"].doc
        assert ", ".join(family.lora_targets) in LORA_SCHEMA["targets"].doc
    policy = CAPTIONING_SCHEMA["evaluate"]["policy"]
    assert policy.choices == tuple(KV_POLICIES) and policy.default == PROPAGATE
    assert all(f"{name}: {doc}" in policy.doc for name, doc in KV_POLICIES.items())
    with pytest.raises(ValueError, match="policy must be one of \\('propagate', 'deferred', 'oracle'\\)"):
        CachedStepper(None, torch.zeros(1, 1, 1), None, 1, policy="nonsense")


class _Configured(torch.nn.Module):
    def __init__(self, model_type: str) -> None:
        super().__init__()
        self.config = type("Config", (), {"model_type": model_type})()


def test_an_unknown_type_or_model_type_is_one_line():
    with pytest.raises(RecipeError, match=r"^model\.decoder\.type: 'gpt5' is not allowed; allowed: gpt2, llama$"):
        build_captioner(spec("gpt2") | {"decoder": {"type": "gpt5"}})
    with pytest.raises(ModelLoadError, match=r"model type 'bert' has no decoder adapter \(gpt2, llama\)$"):
        decoder_adapter(_Configured("bert"))


class FakeAdapter(GPT2DecoderAdapter):
    """A 'new family': GPT-2's maths under another model type (what a new adapter file would hold)."""


def build_fake_decoder(vocab_size: int, pretrained: str | None = None, special_ids: dict | None = None,
                       **config) -> torch.nn.Module:
    decoder = build_gpt2_decoder(vocab_size, pretrained, special_ids, **config)
    decoder.config.model_type = "fake-lm"
    return decoder


FAKE = DecoderFamily(name="fake", build=build_fake_decoder, adapter=FakeAdapter, model_types=("fake-lm",),
                     lora_targets=("c_fc",), lora_default_targets=("c_fc",), lora_fan_in_fan_out=True,
                     doc="a family registered by a test", config_doc="GPT2Config")


def test_a_family_registered_in_the_table_builds_decodes_and_saves_through_the_captioner(monkeypatch, tmp_path):
    monkeypatch.setitem(DECODER_FAMILIES, "fake", FAKE)
    torch.manual_seed(0)
    model = build_captioner(spec("fake", DECODER_CONFIGS["gpt2"])).eval()
    assert type(model.adapter) is FakeAdapter and model.num_layers == 2
    images = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        features = model.encode(images)
        result = greedy_decode(model, features, None, 5, 1, 2)
    assert len(result.tokens) == 3
    assert model(images, torch.randint(3, 20, (3, 4))).shape == (2, 3, 4, 20)
    save_captioner(model, tmp_path)
    again = load_captioner(tmp_path).eval()
    assert type(again.adapter) is FakeAdapter
    with torch.inference_mode():
        assert greedy_decode(again, features, None, 5, 1, 2).tokens == result.tokens


def test_lora_targets_come_from_the_registry(monkeypatch):
    monkeypatch.setitem(DECODER_FAMILIES, "fake", FAKE)
    decoder_spec = {"type": "fake", "pretrained": "somewhere", "freeze": True, "lora": {"r": 2}}
    assert check_lora(decoder_spec)["targets"] == ["c_fc"]
    with pytest.raises(RecipeError, match=r"'c_attn' is not a module of a fake decoder layer; allowed: c_fc$"):
        check_lora({**decoder_spec, "lora": {"targets": ["c_attn"]}})
    monkeypatch.setitem(DECODER_FAMILIES, "fake", FAKE.__class__(**{**FAKE.__dict__, "lora_targets": ()}))
    with pytest.raises(RecipeError, match=r"decoder\.type 'fake' has no LoRA targets; allowed types: gpt2, llama$"):
        check_lora(decoder_spec)
    pytest.importorskip("peft")
    monkeypatch.setitem(DECODER_FAMILIES, "fake", FAKE)
    decoder = build_fake_decoder(20, **DECODER_CONFIGS["gpt2"])
    add_lora(decoder, "fake", check_lora(decoder_spec))
    wrapped = {name.rsplit(".lora_A", 1)[0] for name, _ in decoder.named_parameters()
               if is_lora_parameter(name) and ".lora_A." in name}
    assert wrapped == {f"transformer.h.{i}.mlp.c_fc" for i in range(2)}
