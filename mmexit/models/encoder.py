"""MultiExitEncoder: an HF encoder with an exit head after chosen layers.

The full-model path and the early-exit path call the same pieces (``embed``, ``run_layer``,
``exit_logits``); ``mmexit.inference.encoder`` drives them with a rule, ``forward_exits`` computes
every exit for training and simulated sweeps. Checkpoints are ``model.safetensors`` plus
``mmexit_model.json`` in one folder (``save_pretrained`` / ``from_pretrained``).
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mmexit.errors import ModelLoadError
from mmexit.models.adapters import LayerContext, adapter_for
from mmexit.models.heads import ExitHead

CONFIG_NAME = "mmexit_model.json"
WEIGHTS_NAME = "model.safetensors"


def parse_exit_layers(exits: str | list[int], num_layers: int) -> list[int]:
    """'all' -> [1..L]; a list is checked against the depth; the last layer is always added."""
    if exits == "all":
        return list(range(1, num_layers + 1))
    layers = sorted(set(int(layer) for layer in exits))
    if layers[-1] > num_layers:
        raise ModelLoadError(f"model.exits: layer {layers[-1]} is deeper than the backbone's {num_layers} layers")
    if layers[-1] != num_layers:
        layers.append(num_layers)
    return layers


class MultiExitEncoder(nn.Module):
    """Backbone + exits. ``exit_layers`` are 1-based layer numbers; exit j follows layer exit_layers[j]."""

    def __init__(
        self,
        backbone: nn.Module,
        num_labels: int,
        exits: str | list[int] = "all",
        pooling: str = "cls",
        head_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter_for(backbone)
        self.num_layers = len(self.adapter.layers)
        self.exit_layers = parse_exit_layers(exits, self.num_layers)
        self.num_labels = num_labels
        self.pooling = pooling
        self.head_dropout = head_dropout
        hidden_size = backbone.config.hidden_size
        final_norm = self.adapter.take_final_norm()  # pre-LN backbones: every exit gets a copy
        self.heads = nn.ModuleList(
            ExitHead(hidden_size, num_labels, pooling, head_dropout, copy.deepcopy(final_norm))
            for _ in self.exit_layers
        )
        self._init_poolers_from_backbone()
        #: metadata saved with a trained model (task, label names, max_length)
        self.config_extra: dict = {}
        # layer index (0-based) -> exit index, for layers followed by an exit
        self.exit_after = {layer - 1: index for index, layer in enumerate(self.exit_layers)}

    def _init_poolers_from_backbone(self) -> None:
        """Start every exit's pooler from the backbone's pretrained pooler when it has one, then
        drop the backbone's pooler: it would be a parameter no loss uses (DDP refuses those)."""
        pooler = getattr(self.backbone, "pooler", None)
        dense = pooler if isinstance(pooler, nn.Linear) else getattr(pooler, "dense", None)  # ALBERT: a Linear
        if isinstance(dense, nn.Linear):
            for head in self.heads:
                head.dense.load_state_dict(dense.state_dict())
        if pooler is not None:
            self.backbone.pooler = None

    @property
    def num_exits(self) -> int:
        return len(self.exit_layers)

    def head_kind(self, parameter_name: str) -> str | None:
        """"internal" / "final" for a parameter of an internal / the last exit head, None for the
        backbone. Two-stage training and the head learning rate read this."""
        if not parameter_name.startswith("heads."):
            return None
        return "final" if int(parameter_name.split(".")[1]) == self.num_exits - 1 else "internal"

    # ------------------------------------------------------------------ the pieces both paths use
    def embed(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Optional[Tensor] = None
    ) -> tuple[Tensor, LayerContext]:
        """[batch, seq] -> hidden [batch, seq, hidden] and the per-row layer context."""
        hidden = self.adapter.embed(input_ids, token_type_ids)
        context = self.adapter.context(hidden, attention_mask)
        context["attention_mask"] = attention_mask
        return hidden, context

    def run_layer(self, index: int, hidden: Tensor, context: LayerContext) -> Tensor:
        """Layer ``index`` (0-based): [batch, seq, hidden] -> [batch, seq, hidden]."""
        return self.adapter.call_layer(index, hidden, context)

    def exit_pooled(self, exit_index: int, hidden: Tensor, context: LayerContext) -> Tensor:
        """Exit ``exit_index``'s pooled representation [batch, hidden]."""
        return self.heads[exit_index].pool(hidden, context["attention_mask"])

    def exit_logits(self, exit_index: int, hidden: Tensor, context: LayerContext) -> Tensor:
        """Exit ``exit_index``'s logits [batch, num_labels] from layer output [batch, seq, hidden]."""
        head = self.heads[exit_index]
        return head.classify(head.pool(hidden, context["attention_mask"]))

    # ------------------------------------------------------------------------------ full passes
    def forward_exits(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Optional[Tensor] = None,
        detach_between_exits: bool = False,
        return_pooled: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Every exit's logits [num_exits, batch, num_labels] (all layers run).

        detach_between_exits: SWEET's gradient separation; the hidden state handed on after an
        exit is detached, so exit i's loss reaches only the layers since the previous exit
        (exit 0 also the embeddings) and its own head.
        return_pooled: also return the pooled states [num_exits, batch, hidden].
        """
        hidden, context = self.embed(input_ids, attention_mask, token_type_ids)
        logits, pooled = [], []
        for index in range(self.num_layers):
            hidden = self.run_layer(index, hidden, context)
            exit_index = self.exit_after.get(index)
            if exit_index is None:
                continue
            head = self.heads[exit_index]
            state = head.pool(hidden, attention_mask)
            logits.append(head.classify(state))
            pooled.append(state)
            if detach_between_exits:
                hidden = hidden.detach()
        if return_pooled:
            return torch.stack(logits), torch.stack(pooled)
        return torch.stack(logits)

    def forward_full(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Optional[Tensor] = None
    ) -> Tensor:
        """The full model: every layer, then the last exit only. [batch, num_labels]."""
        hidden, context = self.embed(input_ids, attention_mask, token_type_ids)
        for index in range(self.num_layers):
            hidden = self.run_layer(index, hidden, context)
        return self.exit_logits(self.num_exits - 1, hidden, context)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Optional[Tensor] = None,
        detach_between_exits: bool = False,
        return_pooled: bool = False,
        final_only: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Training entry point (losses call ``model(...)`` so DDP wrappers see the forward).

        final_only: the full model's logits as [1, batch, labels]; otherwise ``forward_exits``.
        """
        if final_only:
            return self.forward_full(input_ids, attention_mask, token_type_ids).unsqueeze(0)
        return self.forward_exits(input_ids, attention_mask, token_type_ids, detach_between_exits, return_pooled)

    # ------------------------------------------------------------------------------ checkpoints
    def model_config(self) -> dict:
        return {
            "backbone_config": self.backbone.config.to_dict(),
            "num_labels": self.num_labels,
            "exit_layers": self.exit_layers,
            "pooling": self.pooling,
            "head_dropout": self.head_dropout,
        }

    def save_pretrained(self, folder: str | Path, extra: Optional[dict] = None) -> None:
        """Write ``model.safetensors`` and ``mmexit_model.json`` (plus ``extra`` metadata)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {key: value.detach().contiguous().cpu() for key, value in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_NAME))
        config = self.model_config() | {"extra": extra or {}}
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(cls, folder: str | Path, weights: bool = True) -> "MultiExitEncoder":
        """Rebuild a trained multi-exit model from a folder written by ``save_pretrained``; with
        ``weights=False`` its structure only (every tensor on the meta device, nothing read or allocated)."""
        from transformers import AutoConfig, AutoModel

        folder = Path(folder)
        if (folder / "model" / CONFIG_NAME).exists():
            folder = folder / "model"
        config_path = folder / CONFIG_NAME
        if not config_path.exists():
            raise ModelLoadError(f"{folder}: not an mmexit model folder (no {CONFIG_NAME})")
        config = json.loads(config_path.read_text())
        backbone_config = dict(config["backbone_config"])
        model_type = backbone_config.pop("model_type")
        with contextlib.nullcontext() if weights else torch.device("meta"):
            backbone = AutoModel.from_config(AutoConfig.for_model(model_type, **backbone_config))
            model = cls(
                backbone, config["num_labels"], config["exit_layers"], config["pooling"], config["head_dropout"]
            )
        if weights:
            model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
        model.config_extra = dict(config.get("extra") or {})
        return model
