"""exit_losses: each exit's teacher-forced cross-entropy on held-out captions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmexit_testing import CAPTION_BOS as BOS, CAPTION_EOS as EOS, CAPTION_PAD as PAD
from mmexit.training.held_out import exit_losses


class Ids:
    bos_id, eos_id, pad_id = BOS, EOS, PAD


def test_exit_losses_are_each_exits_token_cross_entropy(tiny_captioner, tiny_features):
    torch.manual_seed(2)
    captions = [[torch.randint(3, 30, (int(n),)).tolist() for n in torch.randint(2, 9, (2,))] for _ in range(6)]
    losses = exit_losses(tiny_captioner, tiny_features, captions, Ids(), max_length=10, batch_size=5)
    assert losses.shape == (tiny_captioner.num_exits,)
    # by hand: every (image, caption) pair alone, BOS + tokens in, tokens + EOS out, summed over tokens
    total, count = torch.zeros(tiny_captioner.num_exits), 0
    with torch.inference_mode():
        for image, references in enumerate(captions):
            for ids in references:
                inputs = torch.tensor([[BOS, *ids]])
                targets = torch.tensor(ids + [EOS])
                logits = tiny_captioner(encoded=tiny_features[image:image + 1], input_ids=inputs)[:, 0]  # [exits, T, V]
                total += torch.stack([F.cross_entropy(exit_logits, targets, reduction="sum") for exit_logits in logits])
                count += len(targets)
    torch.testing.assert_close(losses, total / count, rtol=1e-4, atol=1e-4)
    assert not tiny_captioner.training
