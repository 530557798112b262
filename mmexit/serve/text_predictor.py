"""``TextPredictor.predict``: labels, probabilities and exit layers for new texts (or pairs), batched."""

from __future__ import annotations

from typing import Sequence, Union

import torch

from mmexit.data.examples import TextExample
from mmexit.data.text import encode
from mmexit.errors import DataError
from mmexit.inference.encoder import early_exit_forward
from mmexit.serve.predictor import Predictor

TextInput = Union[str, Sequence[str], dict]


def as_example(item: TextInput, position: int) -> TextExample:
    """A text, a (text, text_pair) pair, or {"text", "text_pair"} -> TextExample (label unused)."""
    if isinstance(item, str):
        return TextExample(item, None, 0)
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        pair = item.get("text_pair")
        if pair is not None and not isinstance(pair, str):
            raise DataError(f"input {position}: text_pair must be a string")
        return TextExample(item["text"], pair, 0)
    if isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(t, str) for t in item):
        return TextExample(item[0], item[1], 0)
    raise DataError(f"input {position}: expected a text, a [text, text_pair] pair or {{\"text\": ...}}, "
                    f"got {type(item).__name__}")


class TextPredictor(Predictor):
    """Classifies texts with the run's model and calibrated rule (rows leave at their own exits)."""

    @property
    def label_names(self) -> list[str]:
        return list(self.model.config_extra.get("labels") or [])

    @property
    def max_length(self) -> int:
        return int(self.recipe["model"]["max_length"])

    @torch.inference_mode()
    def predict(self, texts: Sequence[TextInput], batch_size: int = 32) -> list[dict]:
        """Per input: ``label`` (class name, or the value for regression), ``label_index``,
        ``probabilities`` (softmax of the exit's logits, with the rule's temperature when calibrated),
        ``exit_layer`` (1-based layer of the exit it left at)."""
        self.check_weights()
        examples = [as_example(item, position) for position, item in enumerate(texts)]
        names = self.label_names
        results = []
        for start in range(0, len(examples), batch_size):
            batch = encode(self.processor, examples[start:start + batch_size], self.max_length)
            inputs = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
            output = early_exit_forward(self.model, self.rule, **inputs)
            logits = output.logits.float()
            temperatures = getattr(self.rule, "temperatures", None)
            for row in range(logits.shape[0]):
                exit_index = int(output.exit_index[row])
                row_logits = logits[row]
                if logits.shape[-1] == 1:
                    value = float(row_logits[0])
                    results.append({"label": value, "label_index": None, "probabilities": None,
                                    "exit_layer": int(output.layers_used[row])})
                    continue
                if temperatures is not None:
                    row_logits = row_logits / float(temperatures[exit_index])
                probabilities = row_logits.softmax(-1)
                index = int(output.logits[row].argmax())
                results.append({"label": names[index] if index < len(names) else index, "label_index": index,
                                "probabilities": [round(float(p), 6) for p in probabilities],
                                "exit_layer": int(output.layers_used[row])})
        return results
