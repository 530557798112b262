"""Teacher-forcing batches of (image, caption) pairs for training and calibrating a captioner."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset


def batch_tensors(token_lists: list[list[int]], bos: int, eos: int, pad: int, max_length: int) -> tuple[Tensor, Tensor]:
    """Teacher-forcing inputs [B, T] and targets [B, T] (-100 where padded); captions cut at max_length.

    Input ``[bos] + ids``, target ``ids + [eos]``, right-padded; padding targets are ignored (by
    length, so pad may equal eos as with GPT-2's tokenizer).
    """
    cut = [ids[: max_length - 1] for ids in token_lists]
    length = max(len(ids) for ids in cut) + 1
    inputs = torch.full((len(cut), length), pad, dtype=torch.long)
    targets = torch.full((len(cut), length), -100, dtype=torch.long)
    for row, ids in enumerate(cut):
        inputs[row, : len(ids) + 1] = torch.tensor([bos] + ids)
        targets[row, : len(ids) + 1] = torch.tensor(ids + [eos])
    return inputs, targets


class CaptionPairs(Dataset):
    """Every (image, caption) pair: images [N, 3, S, S] preprocessed; captions: token ids per image."""

    def __init__(self, images: Tensor, captions: list[list[list[int]]]) -> None:
        self.images = images
        self.pairs = [(index, ids) for index, per_image in enumerate(captions) for ids in per_image]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[int, list[int]]:
        return self.pairs[index]


class CaptionCollator:
    """collate_fn: pairs -> {key: images [B, 3, S, S], "input_ids" [B, T], "labels" [B, T]}.

    key "encoded": ``images`` holds a frozen encoder's features [N, P, D] instead of pixels."""

    def __init__(self, images: Tensor, tokenizer, max_length: int, key: str = "images") -> None:
        self.images, self.tokenizer, self.max_length, self.key = images, tokenizer, max_length, key

    def __call__(self, pairs: list[tuple[int, list[int]]]) -> dict[str, Tensor]:
        tokenizer = self.tokenizer
        inputs, targets = batch_tensors([ids for _, ids in pairs], tokenizer.bos_id, tokenizer.eos_id,
                                        tokenizer.pad_id, self.max_length)
        return {self.key: self.images[torch.tensor([index for index, _ in pairs])], "input_ids": inputs,
                "labels": targets}
