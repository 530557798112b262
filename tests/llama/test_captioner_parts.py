"""The parts a real captioner needs: frozen encoder/decoder, a pooled image prefix, a caption
vocabulary head, and training from precomputed encoder features."""

from __future__ import annotations

import pytest
import torch

from llama_testing import VOCAB, llama_spec
from mmexit.errors import ModelLoadError
from mmexit.inference.search import greedy_decode
from mmexit.models.adapters.vision import PooledTokens
from mmexit.models.captioner import build_captioner, load_captioner, save_captioner
from mmexit.training.trainer import set_trainable


def _frozen_spec(**extra) -> dict:
    spec = llama_spec(exits=[2, 4], exit_head="adapter")
    spec["encoder"]["freeze"] = True
    spec["decoder"]["freeze"] = True
    spec["projection"] = "mlp"
    spec.update(extra)
    return spec


def test_frozen_parts_stay_frozen_when_everything_trains():
    torch.manual_seed(0)
    model = build_captioner(_frozen_spec())
    set_trainable(model, "all")
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all(name.startswith(("projection.", "exit_modules.")) for name in trained)
    assert any(name.startswith("decoder.") for name, _ in model.named_parameters())  # frozen, not absent


def test_unfrozen_decoder_trains():
    torch.manual_seed(0)
    model = build_captioner(llama_spec(exits=[2, 4]))
    set_trainable(model, "all")
    assert any(p.requires_grad for name, p in model.named_parameters() if name.startswith("decoder."))


def test_pooled_tokens_average_the_patch_grid():
    class Grid(torch.nn.Module):
        width = 3

        def forward(self, images):  # CLS + a 4x4 grid whose value is its column index
            grid = torch.arange(4.0).repeat(4)[None, :, None].expand(images.shape[0], 16, 3)
            return torch.cat([torch.full((images.shape[0], 1, 3), -1.0), grid], dim=1)

    pooled = PooledTokens(Grid(), 2)(torch.zeros(2, 3, 8, 8))
    assert pooled.shape == (2, 5, 3)
    assert torch.equal(pooled[0, 0], torch.full((3,), -1.0))  # the CLS token is kept
    assert torch.allclose(pooled[0, 1:, 0], torch.tensor([0.5, 2.5, 0.5, 2.5]))


class _Tokens(torch.nn.Module):
    width = 2

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    def forward(self, images):
        return torch.zeros(images.shape[0], self.count, 2)


def test_pooled_tokens_reject_a_non_square_grid():
    with pytest.raises(ModelLoadError, match="pool_grid"):
        PooledTokens(_Tokens(58), 2)(torch.zeros(1, 3, 8, 8))  # 50..58: no square grid after 0..8 lead tokens


def test_caption_vocabulary_head_scores_only_its_tokens(tmp_path):
    torch.manual_seed(0)
    ids = [1, 5, 7, 11, 20]
    model = build_captioner({**llama_spec(exits=[2, 4]), "head_ids": ids}).eval()
    full = build_captioner(llama_spec(exits=[2, 4])).eval()
    full.load_state_dict(model.state_dict())
    hidden = torch.randn(3, 32)
    for exit_index in range(model.num_exits):
        logits, reference = model.exit_logits(exit_index, hidden), full.exit_logits(exit_index, hidden)
        assert logits.shape == (3, VOCAB)
        torch.testing.assert_close(logits[:, ids], reference[:, ids])
        others = torch.ones(VOCAB, dtype=torch.bool)
        others[ids] = False
        assert bool((logits[:, others] <= -1e8).all())
    with torch.inference_mode():
        result = greedy_decode(model, model.encode(torch.randn(2, 3, 32, 32)), None, 6, 1, 5, "propagate")
    assert all(token in ids for row in result.tokens for token in row)
    save_captioner(model, tmp_path)
    again = load_captioner(tmp_path)
    assert again.head_ids.tolist() == ids
    structure = load_captioner(tmp_path, weights=False)  # what the HTTP process of serve --engine-process holds
    assert {t.device.type for t in [*structure.parameters(), *structure.buffers()]} == {"meta"}
    assert {k: v.shape for k, v in structure.state_dict().items()} == {k: v.shape for k, v in again.state_dict().items()}
    assert structure.exits == again.exits and structure.num_layers == again.num_layers


def test_training_from_encoded_features_equals_training_from_images():
    torch.manual_seed(0)
    model = build_captioner(_frozen_spec()).eval()
    images, ids = torch.randn(2, 3, 32, 32), torch.randint(0, VOCAB, (2, 5))
    with torch.no_grad():
        encoded = model.encoder(images)
    torch.testing.assert_close(model(encoded=encoded, input_ids=ids), model(images, ids))


def test_a_frozen_decoder_with_adapter_heads_gets_a_final_adapter():
    torch.manual_seed(0)
    model = build_captioner(_frozen_spec())
    assert len(model.exit_modules) == model.num_exits  # one per exit, the last one included
    assert model.head_kind(f"exit_modules.{model.num_exits - 1}.linear.weight") == "final"
    assert model.head_kind("exit_modules.0.linear.weight") == "internal"
    hidden = torch.randn(2, 32)
    with torch.no_grad():  # zero-initialised: the final exit starts as the decoder's own head
        torch.testing.assert_close(model.exit_logits(model.num_exits - 1, hidden),
                                   model.adapter.lm_head(model.adapter.final_norm(hidden)))
        model.exit_modules[-1].linear.bias.fill_(1.0)
        assert not torch.allclose(model.exit_logits(model.num_exits - 1, hidden),
                                  model.adapter.lm_head(model.adapter.final_norm(hidden)))


def test_label_smoothing_spreads_over_the_caption_vocabulary_only():
    """With a caption vocabulary the joint loss is computed over the heads' tokens: label smoothing
    over the -1e9 floor would add ~1e8 and pull every head flat; restricted, the loss equals
    cross-entropy over those tokens' logits alone, and a target outside them is refused."""
    from mmexit.training.joint import JointLoss

    torch.manual_seed(0)
    ids = [1, 2, 5, 7, 11, 20]
    model = build_captioner({**llama_spec(exits=[2, 4]), "head_ids": ids}).eval()
    images, input_ids = torch.randn(2, 3, 32, 32), torch.tensor([[1, 5, 7, 11], [1, 20, 2, 2]])
    labels = torch.tensor([[5, 7, 11, 2], [20, 2, -100, -100]])
    batch = {"images": images, "input_ids": input_ids, "labels": labels}
    smoothed = JointLoss([1.0, 1.0], label_smoothing=0.1, classes=model.head_ids)
    loss, _ = smoothed(model, batch, 0.0)
    floor_loss, _ = JointLoss([1.0, 1.0], label_smoothing=0.1)(model, batch, 0.0)
    assert float(floor_loss.detach()) > 1e6 > float(loss.detach())  # what the recipe logged before (98 million)
    logits = model(images=images, input_ids=input_ids)[:, labels != -100][..., ids]  # [exits, N, 6]
    targets = torch.tensor([ids.index(t) for t in labels[labels != -100].tolist()])
    expected = torch.stack([torch.nn.functional.cross_entropy(l, targets, label_smoothing=0.1) for l in logits]).mean()
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="not among the heads"):
        smoothed(model, {**batch, "labels": torch.tensor([[5, 7, 11, 3], [20, 2, -100, -100]])}, 0.0)
