"""ALBERT, DeBERTa (v1, v2 with its convolution, v3-like), DistilBERT and ModernBERT pass the
equivalence tests the BERT family passes, on tiny random configs built in code (offline):
never-exit == the transformers model; batched with shrinking rows == one by one == simulated;
the continuous serving engine == each row alone; truncation and save/load keep the model."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import transformers as hf

from mmexit_testing import one_torch_thread, random_batch, run_interleaved
from mmexit.exits.confidence import EntropyRule, MaxProbRule, NeverExitRule
from mmexit.exits.patience import PatienceRule
from mmexit.inference.encoded_rows import EncodedRow
from mmexit.inference.encoder import early_exit_forward
from mmexit.inference.exit_loop import simulate_exits
from mmexit.models.encoder import MultiExitEncoder
from mmexit.models.loading import TINY_SIZES, tiny_backbone, truncate_backbone
from mmexit.serve.engine import ContinuousEngine

FAMILIES = ["albert", "albert-groups", "deberta", "deberta-v2-conv", "deberta-v1", "distilbert", "modernbert"]
_one_thread = pytest.fixture(autouse=True)(one_torch_thread)


def family_backbone(name: str) -> torch.nn.Module:
    """A 4-layer random backbone (hidden 32); variants beyond loading.tiny_backbone's are built here."""
    if name == "albert-groups":  # two layer groups, two applications each
        return hf.AlbertModel(hf.AlbertConfig(vocab_size=30522, embedding_size=16, max_position_embeddings=128,
                                              num_hidden_groups=2, **TINY_SIZES))
    if name == "deberta-v2-conv":  # v2-xlarge-like: convolution after layer 1, absolute positions, token types
        return hf.DebertaV2Model(hf.DebertaV2Config(
            vocab_size=30522, max_position_embeddings=128, relative_attention=True, position_buckets=8,
            norm_rel_ebd="layer_norm", pos_att_type=["p2c", "c2p"], conv_kernel_size=3, embedding_size=16,
            type_vocab_size=2, **TINY_SIZES))
    if name == "deberta-v1":
        return hf.DebertaModel(hf.DebertaConfig(
            vocab_size=30522, max_position_embeddings=128, relative_attention=True, max_relative_positions=-1,
            pos_att_type=["c2p", "p2c"], **TINY_SIZES))
    return tiny_backbone(f"tiny:{name}")


def family_model(name: str, pooling: str = "cls", seed: int = 0) -> tuple[MultiExitEncoder, torch.nn.Module]:
    """The multi-exit model and an untouched copy of its transformers backbone, both in eval mode."""
    torch.manual_seed(seed)
    backbone = family_backbone(name)
    reference = copy.deepcopy(backbone).eval()
    return MultiExitEncoder(backbone, 3, "all", pooling).eval(), reference


def token_types(mask: torch.Tensor) -> torch.Tensor:
    """Pair-like segment ids: the second half of each row's tokens is segment 1."""
    lengths = mask.sum(1, keepdim=True)
    return ((torch.arange(mask.shape[1])[None] >= lengths // 2) & mask.bool()).long()


def threshold_between(values: torch.Tensor) -> float:
    """A threshold near the median that no value sits close to: the middle of the widest gap
    between neighbouring values of the central third (a row on its threshold flips with float noise)."""
    ordered = values.flatten().sort().values
    low, high = len(ordered) // 3, 2 * len(ordered) // 3
    gaps = ordered[low + 1:high + 1] - ordered[low:high]
    at = low + int(gaps.argmax())
    return float(ordered[at] + ordered[at + 1]) / 2


def make_rule(name: str, all_logits: torch.Tensor):
    """Thresholds inside the internal exits' signal: rows exit at different layers."""
    probs = all_logits[:-1].softmax(-1)
    if name == "maxprob":
        return MaxProbRule(threshold_between(probs.amax(-1)))
    if name == "entropy":
        return EntropyRule(threshold_between(-(probs * probs.log()).sum(-1)))
    return PatienceRule(1)


@pytest.mark.parametrize("family", FAMILIES)
def test_never_exit_equals_the_transformers_model(family):
    model, reference = family_model(family)
    ids, mask = random_batch(16)
    types = token_types(mask)
    with torch.inference_mode():
        expected = reference(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        hidden, context = model.embed(ids, mask, types)
        for index in range(model.num_layers):
            hidden = model.run_layer(index, hidden, context)
        head = model.heads[-1]
        real = mask.bool()
        torch.testing.assert_close(head.norm(hidden)[real], expected[real], atol=1e-5, rtol=1e-5)
        # logits: the last exit's pooler + classifier on the transformers model's output
        logits = head.classify(torch.tanh(head.dense(expected[:, 0])))
        full = model.forward_full(ids, mask, types)
        out = early_exit_forward(model, NeverExitRule(), ids, mask, types)
    torch.testing.assert_close(full, logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.logits, full)
    assert out.layers_used.tolist() == [model.num_layers] * 16 == [4] * 16


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rule_name", ["maxprob", "entropy", "patience"])
def test_batched_equals_one_by_one_and_simulated(family, rule_name):
    model, _ = family_model(family)
    ids, mask = random_batch(24, seq=20)
    types = token_types(mask)
    with torch.inference_mode():
        all_logits = model.forward_exits(ids, mask, types)
        rule = make_rule(rule_name, all_logits)
        batched = early_exit_forward(model, rule, ids, mask, types)
        lengths = mask.sum(1).tolist()  # one by one without padding
        singles = [early_exit_forward(model, rule, ids[i:i + 1, :n], mask[i:i + 1, :n], types[i:i + 1, :n])
                   for i, n in enumerate(lengths)]
    assert torch.equal(batched.exit_index, torch.cat([s.exit_index for s in singles]))
    torch.testing.assert_close(batched.logits, torch.cat([s.logits for s in singles]), atol=1e-5, rtol=1e-5)
    assert torch.equal(batched.exit_index, simulate_exits(rule, all_logits))
    assert len(set(batched.exit_index.tolist())) > 1, "rows should leave at different exits"


def random_rows(count: int, seed: int, longest: int = 40) -> list[EncodedRow]:
    """Token rows of 3..longest tokens, a third of them pairs (token types 0 then 1)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        length = int(torch.randint(3, longest + 1, (1,), generator=generator))
        ids = torch.randint(5, 2000, (length,), generator=generator)
        types = (torch.arange(length) >= length // 2).long() if index % 3 == 0 else torch.zeros(length, dtype=torch.long)
        rows.append(EncodedRow(ids, types))
    return rows


@pytest.mark.parametrize("family", ["albert", "deberta", "deberta-v2-conv", "distilbert", "modernbert"])
def test_continuous_engine_equals_each_row_alone(family):
    model, _ = family_model(family, pooling="mean")
    rows = random_rows(40, seed=3)
    with torch.inference_mode():
        ids, mask = random_batch(32, seq=40, seed=5)
        rule = make_rule("maxprob", model.forward_exits(ids, mask))
        reference = []
        for row in rows:
            result = early_exit_forward(model, rule, row.input_ids[None], torch.ones_like(row.input_ids)[None],
                                        row.token_type_ids[None])
            reference.append((result.logits[0], int(result.layers_used[0])))
    assert len({layer for _, layer in reference}) >= 2, "rows should leave at different exits"
    engine = ContinuousEngine(model, rule, 40, max_batch=8)
    answers = run_interleaved(engine, rows, random.Random(family), started=False)
    assert engine.stop(drain=True, timeout=10)
    assert [a.exit_layer for a in answers] == [layer for _, layer in reference]
    for output, (logits, _) in zip(answers, reference):
        torch.testing.assert_close(output.logits, logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["albert", "deberta", "distilbert", "modernbert"])
def test_truncated_backbone_is_the_first_layers(family):
    torch.manual_seed(0)
    backbone = family_backbone(family)
    truncate_backbone(backbone, 2)
    reference = copy.deepcopy(backbone).eval()
    model = MultiExitEncoder(backbone, 2, "all").eval()
    assert model.num_layers == 2 and model.exit_layers == [1, 2]
    ids, mask = random_batch(4)
    with torch.inference_mode():
        hidden, context = model.embed(ids, mask)
        for index in range(2):
            hidden = model.run_layer(index, hidden, context)
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = model.heads[-1].norm(hidden)
    real = mask.bool()
    torch.testing.assert_close(hidden[real], expected[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["albert", "deberta", "distilbert", "modernbert"])
def test_save_and_load_roundtrip(family, tmp_path):
    model, _ = family_model(family)
    model.save_pretrained(tmp_path / "model")
    loaded = MultiExitEncoder.from_pretrained(tmp_path).eval()
    ids, mask = random_batch(4)
    with torch.inference_mode():
        assert torch.equal(loaded.forward_exits(ids, mask), model.forward_exits(ids, mask))
    assert loaded.exit_layers == model.exit_layers == [1, 2, 3, 4]


def test_albert_exits_count_applications_of_the_shared_group():
    model, _ = family_model("albert")
    assert model.num_layers == 4 and model.exit_layers == [1, 2, 3, 4]
    assert len({id(layer) for layer in model.adapter.layers}) == 1  # one group, applied four times
    shared = sum(p.numel() for p in model.backbone.encoder.parameters())
    assert shared == sum(p.numel() for p in model.backbone.encoder.albert_layer_groups.parameters()) + 16 * 32 + 32


def test_modernbert_exits_read_the_final_norm_and_the_backbone_has_none():
    model, reference = family_model("modernbert")
    assert isinstance(model.backbone.final_norm, torch.nn.Identity)
    for head in model.heads:
        assert isinstance(head.norm, torch.nn.LayerNorm)
        assert torch.equal(head.norm.weight, reference.final_norm.weight)
    assert {layer.attention_type for layer in model.adapter.layers} == {"full_attention", "sliding_attention"}


def test_deberta_shares_relative_tables_and_drops_mask_rows():
    from mmexit.models.adapters import subset_context

    model, _ = family_model("deberta")
    ids, mask = random_batch(6)
    _, context = model.embed(ids, mask)
    assert context["shared_relative_pos"].shape == (1, 16, 16)
    assert context["shared_rel_embeddings"].shape == (16, 32)  # 2 x position_buckets
    kept = subset_context(context, torch.tensor([True, False, True, False, False, True]))
    assert kept["mask"].shape[0] == 3 and kept["input_mask"].shape[0] == 3
    assert kept["shared_rel_embeddings"] is context["shared_rel_embeddings"]


def test_unsupported_backbones_fail_with_one_clear_line():
    from mmexit.errors import ModelLoadError

    gpt2 = hf.GPT2Model(hf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100))
    with pytest.raises(ModelLoadError, match="model type 'gpt2' has no mmexit adapter; supported: .*deberta-v2.*modernbert"):
        MultiExitEncoder(gpt2, 2)
    with pytest.raises(ModelLoadError, match="several layer groups"):
        truncate_backbone(family_backbone("albert-groups"), 2)
    with pytest.raises(ModelLoadError, match="not between 1 and the backbone's 4 layers"):
        truncate_backbone(family_backbone("modernbert"), 5)
