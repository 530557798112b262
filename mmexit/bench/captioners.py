"""Captioners for the caption benches: a trained run (its test images, rule and decoding settings),
a saved captioner folder, or a tiny random one built in code."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mmexit.calibration.rule_spec import resolve_rule
from mmexit.errors import ModelLoadError, RecipeError
from mmexit.exits.base import ExitRule
from mmexit.models.captioner import Captioner, build_captioner, load_captioner
from mmexit.serve.caption_predictor import open_image
from mmexit.serve.load import load_captioning
from mmexit.tasks.captioning import load_splits

RANDOM = "random"


def random_captioner(family: str = "gpt2", width: int = 64, layers: int = 6, heads: int = 4, vocab: int = 50,
                     init: float = 0.3, image_size: int = 64) -> tuple[Captioner, int]:
    """A random captioner built in code: a 1-block ViT over ``image_size`` pixels (16-pixel patches),
    a GPT-2 or LLaMA decoder, an exit after every layer, BOS 1, EOS 2; (model in eval mode, image size).
    ``init`` is the decoder's initializer_range (0.3: peaked logits, so confidence rules do exit)."""
    if family == "llama":
        decoder = {"type": "llama", "config": {"hidden_size": width, "intermediate_size": 2 * width,
                                               "num_hidden_layers": layers, "num_attention_heads": heads,
                                               "num_key_value_heads": max(1, heads // 2),
                                               "max_position_embeddings": 256, "initializer_range": init,
                                               "rope_parameters": {"rope_type": "default", "rope_theta": 100.0}}}
    else:
        decoder = {"config": {"n_layer": layers, "n_embd": width, "n_head": heads, "n_positions": 256,
                              "initializer_range": init}}
    spec = {"encoder": {"type": "timm", "name": "vit_tiny_patch16_224",
                        "kwargs": {"img_size": image_size, "patch_size": 16, "embed_dim": 32, "depth": 1,
                                   "num_heads": 2}},
            "decoder": decoder, "vocab_size": vocab, "special_ids": {"bos": 1, "eos": 2, "pad": 0},
            "exits": "all", "exit_head": "shared"}
    return build_captioner(spec).eval(), image_size


def add_random_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``random_captioner`` (used when RUN is ``random``)."""
    group = parser.add_argument_group("RUN random: a tiny random captioner built in code (seconds; a smoke test)")
    group.add_argument("--family", choices=["gpt2", "llama"], default="gpt2", help="the decoder")
    group.add_argument("--width", type=int, default=64)
    group.add_argument("--layers", type=int, default=6)
    group.add_argument("--heads", type=int, default=4)
    group.add_argument("--vocab", type=int, default=50)
    group.add_argument("--init", type=float, default=0.3, help="initializer_range (peaked logits)")
    group.add_argument("--image-size", type=int, default=64,
                       help="pixels of the random images (16-pixel patches: 64 -> 16 patches, 128 -> 64)")


def random_from_args(args: argparse.Namespace) -> tuple[Captioner, int, str]:
    """(model, image size, label) of ``random_captioner`` with the command line's options, seeded."""
    torch.manual_seed(0)
    if args.image_size < 16 or args.image_size % 16:
        raise RecipeError(f"--image-size must be a positive multiple of 16 (16-pixel patches), got {args.image_size}")
    model, size = random_captioner(args.family, args.width, args.layers, args.heads, args.vocab, args.init,
                                   args.image_size)
    patches = (size // 16) ** 2
    return model, size, f"random {args.family} decoder {args.layers}x{args.width}, vocab {args.vocab}, {patches} patches"


def saved_captioner(path: str) -> Captioner:
    """A saved captioner: a folder holding captioner.json, or a run folder whose model/ does."""
    folder = Path(path)
    for candidate in (folder, folder / "model"):
        if (candidate / "captioner.json").is_file():
            return load_captioner(candidate).eval()
    raise ModelLoadError(f"{folder}: not a captioner (no captioner.json here or in model/); "
                         "pass a captioning run folder, its model/ folder or 'random'")


def test_images(recipe: dict, count: int) -> list[Path]:
    """The first ``count`` images of the run's test split (COCO, Karpathy or generated scenes), in
    the evaluation's order."""
    return [item.path for item in load_splits(recipe)["test"][:count]]


def image_args(recipe: dict) -> tuple:
    """(image size, mean, std) the run's encoder expects."""
    model = recipe["model"]
    return model["image_size"], tuple(model["image_mean"]), tuple(model["image_std"])


@dataclass
class CaptionRun:
    """A trained captioning run ready to decode: encoded test images and its rule (None: full model)."""

    model: Captioner
    features: torch.Tensor  # [images, patches, width]
    rule: Optional[ExitRule]
    key: str  # the operating point, "full" for the full model
    max_len: int
    bos: int
    eos: int
    label: str
    recipe: Optional[dict] = None  # the run's recipe (None for a captioner without a run)
    tokenizer: object = None  # the run's caption tokenizer (encode, bos_id, eos_id)


def load_caption_run(run_dir: str, rule: Optional[str], images: int, device: Optional[str] = None) -> CaptionRun:
    """The run (``mmexit.load``), its rule at ``rule`` (``resolve_rule``; default: its chosen point) and
    its first ``images`` test images, encoded."""
    predictor = load_captioning(run_dir, "this bench decodes captions", rule=rule, device=device)
    recipe = predictor.recipe
    paths = test_images(recipe, images)
    pixels = torch.stack([open_image(path, i, *image_args(recipe)) for i, path in enumerate(paths)])
    model = predictor.model
    with torch.inference_mode():
        features = model.encode(pixels.to(next(model.parameters()).device))
    chosen = None if predictor.operating_point == "full" else predictor.rule
    tokenizer = predictor.processor
    return CaptionRun(model, features, chosen, predictor.operating_point, recipe["evaluate"]["max_len"],
                      tokenizer.bos_id, tokenizer.eos_id, f"{run_dir} ({predictor.operating_point})", recipe, tokenizer)


def random_rule(spec: Optional[str]) -> tuple[Optional[ExitRule], str]:
    """A rule for a random captioner (no run, no calibration): ``resolve_rule`` without a run; 'full': None."""
    rule, key = resolve_rule(None, None, spec or "maxprob@0.5")
    return (None if key == "full" else rule), key
