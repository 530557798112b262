"""Rows of a text request: tokenized one by one for the serving engines, answered as JSON dicts.

A served text becomes an ``EncodedRow`` (``mmexit.inference.encoded_rows``): its token ids [len]
(no padding: the engines pad per layer call) and token type ids [len] or None. ``row_result`` turns
an engine's ``RowOutput`` (exit logits [labels], exit index) into the same dict
``TextPredictor.predict`` returns.
"""

from __future__ import annotations

from typing import Optional, Sequence

from mmexit.data.examples import TextExample
from mmexit.inference.encoded_rows import EncodedRow, RowOutput


def encode_rows(tokenizer, examples: Sequence[TextExample], max_length: int) -> list[EncodedRow]:
    """Tokenize (truncating to ``max_length``) and strip the padding: one ``EncodedRow`` per example.

    Singles and pairs are tokenized separately (one tokenizer call each), so a request may mix them.
    """
    rows: list[Optional[EncodedRow]] = [None] * len(examples)
    for pairs in (False, True):
        positions = [i for i, e in enumerate(examples) if (e.text_b is not None) == pairs]
        if not positions:
            continue
        texts_a = [examples[i].text_a for i in positions]
        texts_b = [examples[i].text_b for i in positions] if pairs else None
        batch = tokenizer(texts_a, texts_b, padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        types = batch.get("token_type_ids")
        for row, position in enumerate(positions):
            keep = batch["attention_mask"][row].bool()
            rows[position] = EncodedRow(batch["input_ids"][row][keep].clone(),
                                        None if types is None else types[row][keep].clone())
    return rows  # type: ignore[return-value]


def row_result(output: RowOutput, label_names: Sequence[str], temperatures: Optional[Sequence[float]]) -> dict:
    """An engine row -> {label, label_index, probabilities, exit_layer} as ``TextPredictor.predict``."""
    logits = output.logits.float()
    if logits.shape[-1] == 1:
        return {"label": float(logits[0]), "label_index": None, "probabilities": None,
                "exit_layer": output.exit_layer}
    scaled = logits / float(temperatures[output.exit_index]) if temperatures is not None else logits
    index = int(logits.argmax())
    return {"label": label_names[index] if index < len(label_names) else index, "label_index": index,
            "probabilities": [round(float(p), 6) for p in scaled.softmax(-1)], "exit_layer": output.exit_layer}
