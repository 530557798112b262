"""LoRA on a frozen pretrained caption decoder (``model.decoder.lora``, peft): what trains, the
starting point (B = 0: the plain model), training moves only the LoRA matrices, save/load of the
merged decoder gives the same outputs, the early-exit engine (cached steps, state propagation,
deferred chunks, continuous ``step_rows``) equals the uncached reference with LoRA layers in place,
for LLaMA and GPT-2 (Conv1D), and bad settings fail with one line naming the key."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from llama_testing import BOS, EOS, PAD, VOCAB, llama_spec
from mmexit.errors import RecipeError
from mmexit.exits.confidence import MaxProbRule, NeverExitRule
from mmexit.inference.search import greedy_decode
from mmexit.inference.stepper import CachedStepper
from mmexit.models.captioner import build_captioner, load_captioner, save_captioner
from mmexit.models.lora import has_lora, is_lora_parameter, merge_lora
from mmexit.recipe import load_recipe, validate_recipe
from mmexit.training.trainer import set_trainable
from uncached_stepper import UncachedStepper

pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[2]
REAL_RECIPE = REPO / "recipes" / "coco" / "dinov2-s_smollm2_coco-mini.yaml"
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
GPT2_EOS = 2
MAX_LEN = 10


@pytest.fixture(scope="module")
def llama_folder(tiny_llama_lm, tmp_path_factory) -> str:
    """The tiny random LLaMA saved as a local HF folder: the 'pretrained' decoder."""
    folder = tmp_path_factory.mktemp("llama") / "hf"
    tiny_llama_lm.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory) -> str:
    """A tiny random GPT-2 with cross-attention saved as a local HF folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(3)
    config = GPT2Config(vocab_size=VOCAB, n_layer=4, n_embd=32, n_head=2, n_positions=24, initializer_range=0.3,
                        add_cross_attention=True, bos_token_id=BOS, eos_token_id=GPT2_EOS, pad_token_id=PAD)
    folder = tmp_path_factory.mktemp("gpt2") / "hf"
    GPT2LMHeadModel(config).save_pretrained(folder)
    return str(folder)


def lora_spec(folder: str, lora: dict | None = LORA, kind: str = "llama", exits="all") -> dict:
    """The real captioner's layout at toy size: frozen encoder and decoder, MLP projection, adapters."""
    spec = llama_spec(exits=exits, exit_head="adapter")
    spec["encoder"]["freeze"] = True
    spec["decoder"] = {"type": kind, "pretrained": folder, "freeze": True, "lora": lora}
    spec["projection"] = "mlp"
    return spec


def build(folder: str, lora: dict | None = LORA, kind: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return build_captioner(lora_spec(folder, lora, kind))


def inputs(seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    ids = torch.cat([torch.full((4, 1), BOS), torch.randint(6, VOCAB, (4, 5), generator=generator)], dim=1)
    return images, ids


def train_steps(model, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps of the exits' summed cross-entropy on random next tokens."""
    set_trainable(model, "all")
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    images, ids = inputs()
    targets = torch.roll(ids, -1, dims=1)
    for _ in range(steps):
        logits = model(images, ids)  # [exits, batch, seq, vocab]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 2), targets.repeat(logits.shape[0], 1).flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def lora_parameters(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if is_lora_parameter(name)}


# ------------------------------------------------------------------------------------ (a) what trains
def test_only_lora_projection_and_exit_adapters_train(llama_folder):
    model = build(llama_folder)
    layers = model.num_layers
    assert len(lora_parameters(model)) == layers * 2 * 2  # q_proj and v_proj: A and B each
    set_trainable(model, "all")
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {name for name, _ in model.named_parameters()
                       if name.startswith(("projection.", "exit_modules.")) or is_lora_parameter(name)}
    attention = model.decoder.model.layers[0].self_attn
    assert not attention.q_proj.base_layer.weight.requires_grad and not attention.k_proj.weight.requires_grad
    assert model.head_kind("decoder.model.layers.0.self_attn.q_proj.lora_A.default.weight") is None  # backbone
    assert model.head_kind("decoder.model.layers.0.self_attn.q_proj.base_layer.weight") == "frozen"
    set_trainable(model, "internal")  # two_stage's second stage: internal heads only, LoRA frozen
    assert not any(p.requires_grad for name, p in model.named_parameters() if is_lora_parameter(name))


# -------------------------------------------------------------------------------- (b) B = 0 at first
def test_lora_starts_as_the_plain_model(llama_folder):
    plain, adapted = build(llama_folder, lora=None).eval(), build(llama_folder).eval()
    assert has_lora(adapted) and not has_lora(plain)
    assert all(not bool(p.any()) for name, p in lora_parameters(adapted).items() if ".lora_B." in name)
    images, ids = inputs()
    with torch.inference_mode():
        torch.testing.assert_close(adapted(images, ids), plain(images, ids), atol=0, rtol=0)
        features = plain.encode(images)
    assert greedy_decode(adapted, features, None, MAX_LEN, BOS, EOS).tokens == \
        greedy_decode(plain, features, None, MAX_LEN, BOS, EOS).tokens


# --------------------------------------------------------------- (c) training moves the LoRA matrices
def test_training_changes_lora_weights_only_and_the_outputs(llama_folder, tiny_llama_lm):
    plain, model = build(llama_folder, lora=None).eval(), build(llama_folder)
    before = lora_parameters(model)
    train_steps(model)
    after = lora_parameters(model)
    assert all(not torch.equal(before[name], after[name]) for name in before)  # A and B both moved
    reference = dict(tiny_llama_lm.named_parameters())
    for name, parameter in model.decoder.named_parameters():  # the base weights are the pretrained ones
        if not is_lora_parameter(name):
            assert torch.equal(parameter, reference[name.replace(".base_layer.", ".")]), name
    images, ids = inputs()
    with torch.inference_mode():
        assert not torch.allclose(model(images, ids)[-1], plain(images, ids)[-1], atol=1e-3)


# ------------------------------------------------------------------------------------ (d) save, load
def test_save_load_of_a_lora_model_gives_the_same_outputs(llama_folder, tiny_llama_lm, tmp_path, monkeypatch):
    model = build(llama_folder)
    train_steps(model)
    images, ids = inputs()
    with torch.inference_mode():
        logits = model(images, ids)
        features = model.encode(images)
    tokens = greedy_decode(model, features, MaxProbRule(0.4), MAX_LEN, BOS, EOS)
    q_proj = model.decoder.model.layers[0].self_attn.q_proj
    merged_weight = q_proj.base_layer.weight + q_proj.get_delta_weight("default")
    save_captioner(model, tmp_path)
    assert not has_lora(model)  # merged in place: plain modules from now on
    saved = json.loads((tmp_path / "captioner.json").read_text())["decoder"]
    assert saved["lora"] is None and saved["pretrained"] is None
    assert saved["lora_merged"] == {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
    with monkeypatch.context() as patch:  # a saved LoRA run is plain: it loads without peft
        patch.setitem(sys.modules, "peft", None)
        again = load_captioner(tmp_path).eval()
    assert not has_lora(again)
    layer = again.decoder.model.layers[0].self_attn
    torch.testing.assert_close(layer.q_proj.weight, merged_weight.detach())  # the update is in the saved weights
    assert not torch.allclose(layer.q_proj.weight, tiny_llama_lm.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(layer.k_proj.weight, tiny_llama_lm.model.layers[0].self_attn.k_proj.weight)
    with torch.inference_mode():
        torch.testing.assert_close(again(images, ids), logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(images, ids), logits, atol=1e-5, rtol=1e-5)  # the merged model itself
    reloaded = greedy_decode(again, features, MaxProbRule(0.4), MAX_LEN, BOS, EOS)
    assert reloaded.tokens == tokens.tokens and reloaded.token_layers == tokens.token_layers


def test_merge_lora_is_a_no_op_without_lora(llama_folder):
    model = build(llama_folder, lora=None)
    assert merge_lora(model.decoder) is False


# ------------------------------------------------------- (e) the early-exit engine with LoRA in place
@pytest.fixture(scope="module")
def trained(llama_folder, gpt2_folder) -> dict:
    """family -> (LoRA captioner trained a few steps, LoRA not merged; image features; EOS id)."""
    out = {}
    for kind, folder, lora, eos in (("llama", llama_folder, LORA, EOS),
                                    ("gpt2", gpt2_folder, {**LORA, "targets": ["c_attn", "c_proj"]}, GPT2_EOS)):
        model = build(folder, lora, kind)
        train_steps(model)
        assert has_lora(model)
        with torch.inference_mode():
            features = model.encode(inputs(seed=11)[0])
        out[kind] = (model, features, eos)
    return out


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_never_exit_equals_full_and_the_hf_forward_with_lora(trained, kind):
    model, features, eos = trained[kind]
    full = greedy_decode(model, features, None, MAX_LEN, BOS, eos)
    never = greedy_decode(model, features, NeverExitRule(), MAX_LEN, BOS, eos)
    uncached = greedy_decode(model, features, None, MAX_LEN, BOS, eos, stepper_class=UncachedStepper)
    assert never.tokens == full.tokens == uncached.tokens
    assert int(never.layers.min()) == model.num_layers
    ids = torch.tensor([[BOS, 7, 9, 11]] * features.shape[0])
    with torch.inference_mode():
        exits = model.forward_exits(features, ids)
        stepper = CachedStepper(model, features, None, ids.shape[1])
        for t in range(ids.shape[1]):  # the cached one-position steps == teacher forcing
            logits, _ = stepper.step(ids[:, t], t)
            torch.testing.assert_close(logits, exits[-1, :, t], atol=1e-5, rtol=1e-5)
        # the per-layer path == transformers' own forward through the peft layers (the decoder's own
        # head on both: the last exit also has an adapter, the decoder being frozen)
        if kind == "llama":
            embeds = torch.cat([features, model.decoder.model.embed_tokens(ids)], dim=1)
            reference = model.decoder(inputs_embeds=embeds).logits[:, features.shape[1]:]
        else:
            reference = model.decoder(input_ids=ids, encoder_hidden_states=features).logits
        hidden = _final_hidden(model, features, ids)
        torch.testing.assert_close(model.adapter.lm_head(model.adapter.final_norm(hidden)), reference,
                                   atol=1e-5, rtol=1e-5)


def _final_hidden(model, features, ids):
    with torch.inference_mode():
        positions = torch.arange(ids.shape[1])
        hidden = model.embed(ids, positions)
        prefix = model.adapter.prefix_length(features)
        if prefix:
            hidden = torch.cat([features, hidden], dim=1)
        for index in range(model.num_layers):
            hidden = model.adapter.layer(index, hidden, features)
        return hidden[:, prefix:]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("policy", ["propagate", "deferred", "oracle"])
def test_cached_early_exit_equals_uncached_with_lora(trained, kind, policy):
    model, features, eos = trained[kind]
    rule = MaxProbRule(0.3)
    cached = greedy_decode(model, features, rule, MAX_LEN, BOS, eos, policy=policy)
    uncached = greedy_decode(model, features, rule, MAX_LEN, BOS, eos, policy=policy, stepper_class=UncachedStepper)
    assert cached.tokens == uncached.tokens
    assert cached.token_layers == uncached.token_layers
    assert int(cached.layers.min()) < model.num_layers  # tokens did exit early


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_propagated_kv_sees_the_lora_update(trained, kind):
    """State propagation's project_kv == the K/V the (LoRA-wrapped) layer writes itself."""
    model, features, _ = trained[kind]
    with torch.inference_mode():
        stepper = CachedStepper(model, features, None, 4)
        for t in range(2):
            stepper.step(torch.full((features.shape[0],), 7 + t), t)
        t = stepper.cache.offset + 1
        hidden = model.embed(torch.full((features.shape[0],), 9), torch.tensor(2))
        for index in range(model.num_layers):
            key, value = model.adapter.project_kv(index, hidden, t)
            hidden = model.adapter.step(index, hidden, stepper.cache, None, t)
            torch.testing.assert_close(key, stepper.cache.keys[index][:, :, t], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(value, stepper.cache.values[index][:, :, t], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_continuous_decoder_equals_greedy_alone_with_lora(trained, kind):
    """step_rows (each row at its own position) with LoRA layers: every image as when decoded alone."""
    from mmexit.inference.continuous_decoder import continuous_greedy_decode

    model, features, eos = trained[kind]
    rule = MaxProbRule(0.3)
    result = continuous_greedy_decode(model, features, rule, MAX_LEN, BOS, eos, slots=3)
    alone = [greedy_decode(model, features[i:i + 1], rule, MAX_LEN, BOS, eos) for i in range(features.shape[0])]
    assert result.tokens == [a.tokens[0] for a in alone]
    assert result.token_layers == [a.token_layers[0] for a in alone]


def test_merged_model_decodes_as_the_lora_model(trained):
    """What evaluation runs after training (merged) gives the LoRA model's captions and exit layers."""
    import copy

    for model, features, eos in trained.values():
        merged = copy.deepcopy(model)
        assert merge_lora(merged.decoder) and not has_lora(merged)
        for policy in ("propagate", "deferred"):
            a = greedy_decode(model, features, MaxProbRule(0.3), MAX_LEN, BOS, eos, policy=policy)
            b = greedy_decode(merged, features, MaxProbRule(0.3), MAX_LEN, BOS, eos, policy=policy)
            assert a.tokens == b.tokens and a.token_layers == b.token_layers


# ------------------------------------------------------------------------------ (f) one-line errors
def _recipe_error(*overrides: str) -> str:
    with pytest.raises(RecipeError) as error:
        validate_recipe(load_recipe(REAL_RECIPE, list(overrides)))
    assert "\n" not in str(error.value)
    return str(error.value)


def test_recipe_lora_key_validates_with_defaults():
    recipe = validate_recipe(load_recipe(REAL_RECIPE))
    assert recipe["model"]["decoder"]["lora"] is None  # the shipped recipe: frozen decoder, no LoRA
    full = validate_recipe(load_recipe(REAL_RECIPE, [
        "model.decoder.lora={r: 8, alpha: 16, dropout: 0.05, targets: [q_proj, v_proj]}"]))
    assert full["model"]["decoder"]["lora"] == {"r": 8, "alpha": 16.0, "dropout": 0.05, "targets": ["q_proj", "v_proj"]}
    short = validate_recipe(load_recipe(REAL_RECIPE, ["model.decoder.lora.r=4"]))
    assert short["model"]["decoder"]["lora"] == {"r": 4, "alpha": 16.0, "dropout": 0.05, "targets": None}
    assert validate_recipe(load_recipe(REAL_RECIPE, ["model.decoder.lora=null"]))["model"]["decoder"]["lora"] is None


@pytest.mark.parametrize("override, expected", [
    ("model.decoder.lora.r=0", r"^model\.decoder\.lora\.r: must be an integer >= 1, got 0$"),
    ("model.decoder.lora.r=2.5", r"^model\.decoder\.lora\.r: expected int, got float 2\.5$"),
    ("model.decoder.lora.alpha=0", r"^model\.decoder\.lora\.alpha: must be > 0"),
    ("model.decoder.lora.dropout=1.5", r"^model\.decoder\.lora\.dropout: must be in \[0, 1\), got 1\.5$"),
    ("model.decoder.lora.rank=8", r"^model\.decoder\.lora\.rank: unknown key.*; allowed: alpha, dropout, r, targets$"),
    ("model.decoder.lora.targets=[q_prj]", r"^model\.decoder\.lora\.targets: unknown module 'q_prj'; allowed: "
                                           r"c_attn, q_attn, c_proj, c_fc \(gpt2\); "
                                           r"q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj \(llama\)$"),
    ("model.decoder.lora.targets=[]", r"^model\.decoder\.lora\.targets: expected a non-empty list of module names"),
    ("model.decoder.lora=8", r"^model\.decoder\.lora: expected dict, got int 8$"),
])
def test_bad_lora_values_fail_at_validation(override, expected):
    message = _recipe_error(override)
    assert re.search(expected, message), message


@pytest.mark.parametrize("change, expected", [
    ({"pretrained": None}, r"^model\.decoder\.lora: needs a pretrained decoder \(model\.decoder\.pretrained"),
    ({"freeze": False}, r"^model\.decoder\.lora: needs model\.decoder\.freeze: true .*with model\.decoder\.freeze: "
                        r"false the whole decoder trains"),
    ({"lora": {"targets": ["c_attn"]}}, r"^model\.decoder\.lora\.targets: 'c_attn' is not a module of a llama decoder "
                                        r"layer; allowed: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj$"),
    ({"lora": {"r": 0}}, r"^model\.decoder\.lora\.r: must be an integer >= 1, got 0$"),
])
def test_bad_lora_combinations_fail_before_the_decoder_loads(llama_folder, change, expected):
    spec = lora_spec(llama_folder)
    spec["decoder"].update(change)
    with pytest.raises(RecipeError, match=expected) as error:
        build_captioner(spec)
    assert "\n" not in str(error.value)


def test_gpt2_targets_and_a_target_matching_nothing(gpt2_folder, llama_folder):
    with pytest.raises(RecipeError, match=r"^model\.decoder\.lora\.targets: 'q_proj' is not a module of a gpt2 "
                                          r"decoder layer; allowed: c_attn, q_attn, c_proj, c_fc$"):
        build_captioner(lora_spec(gpt2_folder, LORA, "gpt2"))
    model = build(gpt2_folder, {"r": 2, "targets": None}, "gpt2")  # the default target: c_attn (self + cross)
    wrapped = {name.rsplit(".lora_A", 1)[0] for name in lora_parameters(model) if ".lora_A." in name}
    assert wrapped == {f"decoder.transformer.h.{i}.{part}.c_attn" for i in range(4) for part in ("attn", "crossattention")}
    from mmexit.models.lora import add_lora

    with pytest.raises(RecipeError, match=r"^model\.decoder\.lora\.targets: 'gate_proj' matches no module of the "
                                          r"decoder; allowed: q_proj"):
        add_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), "llama", {"r": 2, "alpha": 4, "dropout": 0.0,
                                                                         "targets": ["gate_proj"]})


def test_lora_without_peft_is_one_line(llama_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(RecipeError, match=r"^model\.decoder\.lora: needs the package peft \(pip install peft, or "
                                          r"pip install -e \"\.\[lora\]\"\)$"):
        build(llama_folder)


# ------------------------------------------------------------ a LoRA run through the runner, reloaded
def test_a_lora_run_saves_the_merged_decoder_and_reloads_equal(llama_folder, tiny_llama_lm, tmp_path, monkeypatch):
    """The caption quickstart at toy size with the tiny LLaMA as its frozen pretrained decoder and
    LoRA on: the task merges after training, model/ holds the merged weights, and the run folder
    loads back (as mmexit.load does) to the trained model's exact outputs."""
    from mmexit.runner import run_validated
    from mmexit.tasks.captioning import CaptioningTask

    kept = {}
    save_model = CaptioningTask.save_model

    def keep(self, run, folder):
        kept["model"] = run.accelerator.unwrap_model(run.model)
        save_model(self, run, folder)

    monkeypatch.setattr(CaptioningTask, "save_model", keep)
    out = tmp_path / "out"
    recipe = validate_recipe(load_recipe(REPO / "recipes" / "caption_quickstart.yaml", [
        f"data.root={tmp_path / 'scenes'}", f"run.output_dir={out}", "run.stages=[train]", "run.log_with=none",
        "data.scenes={num_train: 16, num_val: 4, num_test: 4, image_size: 32, seed: 0}", "data.verify_images=false",
        "model.image_size=32", "model.encoder.kwargs={img_size: 32, patch_size: 16, embed_dim: 32, depth: 1, num_heads: 2}",
        "model.encoder.freeze=true", "model.decoder={type: llama, pretrained: " + llama_folder + ", freeze: true}",
        "model.decoder.lora={r: 4, alpha: 8, dropout: 0.0}", "model.exit_head=adapter", "model.projection=mlp",
        "train.epochs=2", "train.batch_size=8", "train.lr=0.01"]))
    assert recipe["model"]["decoder"]["lora"] == {"r": 4, "alpha": 8.0, "dropout": 0.0, "targets": None}
    run_validated(recipe)
    trained = kept["model"]
    assert not has_lora(trained)  # merged at the end of training
    saved = json.loads((out / "model" / "captioner.json").read_text())["decoder"]
    assert saved["lora"] is None and saved["lora_merged"]["targets"] == ["q_proj", "v_proj"]
    assert "lora" in (out / "recipe.yaml").read_text()
    loaded, tokenizer = CaptioningTask().load_for_inference(out, recipe)
    for index, layer in enumerate(loaded.decoder.model.layers):
        base = tiny_llama_lm.model.layers[index].self_attn
        assert not torch.allclose(layer.self_attn.q_proj.weight, base.q_proj.weight)  # the LoRA update is kept
        assert not torch.allclose(layer.self_attn.v_proj.weight, base.v_proj.weight)
        assert torch.equal(layer.self_attn.k_proj.weight, base.k_proj.weight)  # untouched: frozen, no LoRA
    state, again = trained.state_dict(), loaded.state_dict()
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)
    images, _ = inputs()
    ids = torch.tensor([[tokenizer.bos_id, 5, 6, 7]] * images.shape[0])
    with torch.inference_mode():
        torch.testing.assert_close(loaded(images, ids), trained.eval()(images, ids), atol=0, rtol=0)
        features = loaded.encode(images)
    rule = MaxProbRule(0.4)
    assert greedy_decode(loaded, features, rule, MAX_LEN, tokenizer.bos_id, tokenizer.eos_id).tokens == \
        greedy_decode(trained, features, rule, MAX_LEN, tokenizer.bos_id, tokenizer.eos_id).tokens


def test_lora_with_init_from_and_training_is_one_line(tmp_path):
    """A trained run's decoder already holds its merged LoRA: no new LoRA on top of it."""
    from mmexit.tasks.base import Run
    from mmexit.tasks.captioning import CaptioningTask

    task = CaptioningTask()
    recipe = validate_recipe(load_recipe(REAL_RECIPE, [f"model.init_from={tmp_path}", "model.decoder.lora.r=4"]))
    with pytest.raises(RecipeError, match=r"^model\.decoder\.lora: not with model\.init_from and the train stage"):
        task.build_model(Run(recipe, task, tmp_path, accelerator=None))
