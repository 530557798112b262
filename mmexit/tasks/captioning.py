"""Image captioning as a task: data, captioner, training, per-token exit statistics, evaluation.

Data are checked before anything is written (images exist and decode). Training goes through the
one trainer with the joint exit loss over every caption token (``train.loss``: exit weights and
an optional KL to the final exit) or two stages. Calibration statistics are per target token under
teacher forcing; "correct" means equal to the full model's greedy token (``calibration.labels:
full_model``) or to the reference token. Evaluation is in ``mmexit.evaluation.caption_eval``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from mmexit.calibration.statistics import ExitStatistics
from mmexit.data.augment import with_views
from mmexit.data.caption_batches import CaptionCollator, CaptionPairs, batch_tensors
from mmexit.data.caption_tokenizer import (
    caption_vocabulary,
    load_pretrained_tokenizer,
    load_word_tokenizer,
    train_word_tokenizer,
)
from mmexit.data.coco import CaptionItem, check_items, load_coco_annotations, load_images, load_karpathy
from mmexit.data.flickr import FLICKR_LAYOUTS, load_flickr
from mmexit.data.scenes import generate_scenes
from mmexit.errors import CalibrationError, DataError, ModelLoadError, RecipeError
from mmexit.evaluation.loop import Evaluation, evaluate_rules
from mmexit.exits.base import ExitRule
from mmexit.models.captioner import Captioner, build_captioner, load_captioner, save_captioner
from mmexit.models.lora import merge_lora
from mmexit.tasks.base import Run, Task
from mmexit.tasks.caption_evaluation import CaptionEvaluator
from mmexit.tasks.caption_features import encoder_outputs
from mmexit.training.joint import FinalOnlyLoss, InternalExitsLoss, JointLoss
from mmexit.training.trainer import train_stage

#: bytes of all-exit token logits kept for calibrations that need them (temperature, LTT)
MAX_LOGIT_BYTES = 512 * 2**20


def load_splits(recipe: dict) -> dict[str, list[CaptionItem]]:
    """The train / calib / test items the recipe names, checked (images exist and decode)."""
    data = recipe["data"]
    source = data["source"]
    if source in FLICKR_LAYOUTS:
        flickr = data["flickr"] or {}
        if not flickr.get("root"):
            raise RecipeError(f"data.flickr.root: source {source} needs the folder of its distribution "
                              "(e.g. ../shared/data/flickr8k)")
        splits = load_flickr(flickr["root"], source, flickr.get("token_file"), flickr.get("image_dir"),
                             flickr.get("split_files"))
    elif source == "scenes":

        scenes = data["scenes"]
        karpathy = generate_scenes(data["root"], scenes["num_train"], scenes["num_val"], scenes["num_test"],
                                   scenes["image_size"], scenes["seed"])
        splits = load_karpathy(karpathy, Path(data["root"]) / "images")
    elif source == "karpathy":
        if not data["karpathy_file"] or not data["image_root"]:
            raise RecipeError("data: source karpathy needs data.karpathy_file and data.image_root")
        splits = load_karpathy(data["karpathy_file"], data["image_root"])
    else:
        annotations, image_dirs = data["annotations"] or {}, data["image_dirs"] or {}
        splits = {}
        for split, path in annotations.items():
            if split not in image_dirs:
                raise RecipeError(f"data.image_dirs: no image folder for split {split!r}")
            splits[split] = load_coco_annotations(path, image_dirs[split])
            if data["present_images_only"]:
                splits[split] = [item for item in splits[split] if item.path.is_file()]
    if data["carve"]:
        splits = carve(splits, data["carve"])
    chosen = {}
    for role, limit in (("train", "max_train_images"), ("calib", "max_calib_images"), ("test", "max_test_images")):
        name = data[f"{role}_split"]
        name = "val" if name == "dev" and "dev" not in splits else name  # Flickr's dev is Karpathy's val
        if name not in splits:
            raise DataError(f"data: split {name!r} (data.{role}_split) not found; the data has {sorted(splits)}")
        items = splits[name][: data[limit]] if data[limit] else splits[name]
        if not items:
            raise DataError(f"data: split {name!r} has no images")
        chosen[role] = items
    for items in chosen.values():
        check_items(items, data["verify_images"])
    return chosen


def carve(splits: dict[str, list[CaptionItem]], spec: dict) -> dict[str, list[CaptionItem]]:
    """Move a seeded share of ``spec["from"]`` into other splits (appended, or new); the rest stays."""
    import random

    source = spec["from"]
    if source not in splits:
        raise DataError(f"data.carve.from: no split {source!r}; the data has {sorted(splits)}")
    items = list(splits[source])
    random.Random(spec.get("seed", 0)).shuffle(items)
    needed = sum(spec["take"].values())
    if needed >= len(items):
        raise DataError(f"data.carve: takes {needed} of the {len(items)} images of {source!r}; leave some held out")
    out = {name: list(value) for name, value in splits.items()}
    start = 0
    for target, count in spec["take"].items():
        out[target] = out.get(target, []) + items[start:start + count] if target != source else out[target]
        start += count
    out[source] = sorted(items[start:], key=lambda item: item.image_id)
    return out


def image_norm(recipe: dict) -> dict:
    """Image size and normalisation of the recipe's encoder."""
    model = recipe["model"]
    return {"image_size": model["image_size"], "mean": tuple(model["image_mean"]), "std": tuple(model["image_std"])}


class CaptioningTask(Task):
    """``task: captioning``."""

    name = "captioning"

    def load_data(self, recipe: dict) -> dict[str, list[CaptionItem]]:
        return load_splits(recipe)

    # ------------------------------------------------------------------------------------ model
    def _spec(self, recipe: dict, tokenizer) -> dict:
        model = recipe["model"]
        return {
            "encoder": dict(model["encoder"], kwargs=dict(model["encoder"]["kwargs"] or {})),
            "decoder": {"type": model["decoder"]["type"], "pretrained": model["decoder"]["pretrained"],
                        "freeze": model["decoder"]["freeze"], "config": dict(model["decoder"]["config"] or {}),
                        "lora": dict(model["decoder"]["lora"]) if model["decoder"].get("lora") else None},
            "projection": model["projection"],
            "head_vocabulary": model["head_vocabulary"],
            "vocab_size": tokenizer.vocab_size,
            "special_ids": {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id},
            "exits": model["exits"],
            "exit_head": model["exit_head"],
            "image_size": model["image_size"],
            "image_mean": list(model["image_mean"]),
            "image_std": list(model["image_std"]),
        }

    def _trained_folder(self, run: Run) -> Path:
        init = run.recipe["model"]["init_from"]
        if init:
            folder = Path(init)
            return folder / "model" if (folder / "model").is_dir() else folder
        return run.output_dir / "model"

    def build_model(self, run: Run) -> tuple[Captioner, object]:
        recipe = run.recipe
        if "train" in recipe["run"]["stages"] and not recipe["model"]["init_from"]:
            if recipe["tokenizer"]["type"] == "word":
                captions = [c for item in run.data["train"] for c in item.captions]
                tokenizer = train_word_tokenizer(captions, recipe["tokenizer"]["min_frequency"])
            else:
                tokenizer = load_pretrained_tokenizer(recipe["tokenizer"]["name"])
            spec = self._spec(recipe, tokenizer)
            if spec["head_vocabulary"] == "captions":
                spec["head_ids"] = caption_vocabulary(tokenizer, [c for item in run.data["train"] for c in item.captions])
            return build_captioner(spec), tokenizer
        if recipe["model"]["decoder"].get("lora") and "train" in recipe["run"]["stages"]:
            raise RecipeError("model.decoder.lora: not with model.init_from and the train stage (a trained run's "
                              "decoder is loaded as saved, its LoRA already merged); train from the pretrained "
                              "decoder, or drop lora")
        folder = self._trained_folder(run)  # a LoRA run's model/ holds the merged decoder: lora is not reapplied
        if not (folder / "captioner.json").is_file():
            raise RecipeError(f"run.stages: no trained captioner in {folder} (add the train stage, or set "
                              "model.init_from to a trained run)")
        return load_captioner(folder), self._tokenizer(recipe, folder)

    def _tokenizer(self, recipe: dict, folder: Path):
        if recipe["tokenizer"]["type"] == "pretrained":
            return load_pretrained_tokenizer(recipe["tokenizer"]["name"])
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{folder}: no tokenizer.json (train first, or set model.init_from to a trained run)")
        return load_word_tokenizer(path)

    def images(self, run: Run, role: str, items: Optional[list[CaptionItem]] = None) -> torch.Tensor:
        """Preprocessed images [N, 3, S, S] of a split (cached per run)."""
        key = f"images:{role}:{len(items) if items is not None else 'all'}"
        if key not in run.state:
            run.state[key] = load_images(items if items is not None else run.data[role], **_load_args(run.recipe),
                                         progress=role == "train")
        return run.state[key]

    def encoded(self, run: Run, role: str, items: Optional[list[CaptionItem]] = None) -> torch.Tensor:
        """The encoder's outputs [N, P, D] (before the projection) for a split's images, kept per run;
        a frozen encoder's from the feature cache (``data.cache_dir``)."""
        items = items if items is not None else run.data[role]
        key = f"encoded:{role}:{len(items)}"
        if key not in run.state:
            model = run.accelerator.unwrap_model(run.model)
            run.state[key] = encoder_outputs(model.encoder, [item.path for item in items], image_norm(run.recipe),
                                             run.recipe["data"]["cache_dir"],
                                             progress=run.accelerator.is_local_main_process)
        return run.state[key]

    def train(self, run: Run) -> list[dict]:
        recipe, train = run.recipe, run.recipe["train"]
        captions = [[run.processor.encode(c) for c in item.captions] for item in run.data["train"]]
        model = run.model
        unwrapped = run.accelerator.unwrap_model(model)
        views = (train["augment"] or {}).get("views", 0)
        if unwrapped.encoder_frozen:  # the same features every epoch: encode each image once (cached on disk)
            encoded = self.encoded(run, "train")
            if views:  # the extra views are encoded here, not cached
                extra, captions = with_views(self.images(run, "train"), captions, train["augment"])
                extra = extra[len(run.data["train"]):]
                encoded = torch.cat([encoded, encode_frozen(unwrapped, extra, quiet=not run.accelerator.is_local_main_process)])
            dataset = CaptionPairs(encoded, captions)
            collate = CaptionCollator(encoded, run.processor, train["max_length"], key="encoded")
        else:
            images, captions = with_views(self.images(run, "train"), captions, train["augment"])
            dataset = CaptionPairs(images, captions)
            collate = CaptionCollator(images, run.processor, train["max_length"])
        seed = recipe["run"]["seed"]
        loss_cfg = train["loss"]
        weights = loss_cfg["exit_weights"]
        if weights == "depth":  # captioning's depth weights are the exits' layer numbers
            weights = [float(layer) for layer in model.exits]
        elif isinstance(weights, list) and len(weights) != model.num_exits:
            raise RecipeError(f"train.loss.exit_weights: {len(weights)} weights for {model.num_exits} exits")
        stage = dict(dataset=dataset, collate=collate, accelerator=run.accelerator, train=train,
                     checkpointing=run.checkpointing)
        if train["schedule"] == "joint":
            loss = JointLoss(weights, loss_cfg["kl_weight"], loss_cfg["kl_temperature"], loss_cfg["label_smoothing"],
                             classes=unwrapped.head_ids)  # a caption vocabulary: the loss over its tokens
            history = train_stage(model, loss, epochs=train["epochs"], lr=train["lr"], seed=seed,
                                  stage_name="train (joint)", **stage)
        else:
            if model.exit_head == "shared":
                raise RecipeError("train.schedule: two_stage needs model.exit_head norm or adapter "
                                  "(shared heads leave nothing to train in stage 2)")
            history = train_stage(model, FinalOnlyLoss(), epochs=train["epochs"], lr=train["lr"], seed=seed,
                                  stage_name="stage1", **stage)
            history += train_stage(model, InternalExitsLoss(), epochs=train["stage2_epochs"] or train["epochs"],
                                   lr=train["stage2_lr"] or train["lr"], seed=seed + 1, stage_name="stage2", **stage)
        run.state.pop("images:train:all", None)
        run.state.pop(f"encoded:train:{len(run.data['train'])}", None)
        # LoRA (model.decoder.lora) into the decoder's weights: evaluation, timing and the saved
        # model/ run plain modules, on every process
        merge_lora(unwrapped.decoder)
        return history

    def save_model(self, run: Run, folder: Path) -> None:
        save_captioner(run.accelerator.unwrap_model(run.model), folder)
        if run.recipe["tokenizer"]["type"] == "word":
            run.processor.save(folder / "tokenizer.json")

    # ----------------------------------------------------------------------------- statistics
    def statistics(self, run: Run) -> ExitStatistics:
        """Teacher-forced per-exit statistics over every (image, reference caption) target token."""
        recipe, tokenizer = run.recipe, run.processor
        items = run.data["calib"][: recipe["calibration"]["max_images"] or None]
        captions = [[tokenizer.encode(c) for c in item.captions] for item in items]
        return token_statistics(run.model, self.encoded(run, "calib", items), captions, tokenizer,
                                recipe["calibration"]["labels"], max_length=recipe["train"]["max_length"],
                                quiet=not run.accelerator.is_local_main_process, encoded=True)

    def evaluate(self, run: Run, rules: list[tuple[dict, ExitRule]], calib: ExitStatistics) -> Evaluation:
        if not run.accelerator.is_main_process:  # decoding is not sharded; the main process reports
            return Evaluation([], {}, [])
        return evaluate_rules(CaptionEvaluator(self, run), rules, run.recipe["evaluate"]["tolerance"])

    def title(self, run: Run) -> str:
        return f"{run.recipe['run']['name']}: captioning early exit ({run.recipe['data']['source']})"

    # ------------------------------------------------------------------------------ inference
    def load_for_inference(self, run_dir: Path, recipe: dict, device: Optional[str] = None, weights: bool = True):
        folder = Path(run_dir) / "model"
        model = load_captioner(folder, weights).eval()
        if device and weights:
            model.to(device)
        return model, self._tokenizer(recipe, folder)


@torch.inference_mode()
def token_statistics(model: Captioner, images: torch.Tensor, captions: list[list[list[int]]], tokenizer,
                     labels: str = "full_model", batch_size: int = 64, max_length: int = 24,
                     quiet: bool = False, encoded: bool = False) -> ExitStatistics:
    """Per-exit statistics over all (image, caption) pairs' target tokens, teacher-forced.

    images [N, 3, S, S] (``encoded``: the encoder's outputs [N, P, D] instead); captions: token ids per image. labels: "full_model" (correct = the last
    exit's argmax) or "reference" (correct = the reference next token).
    """
    pairs = [(i, ids) for i, per_image in enumerate(captions) for ids in per_image]
    device = next(model.parameters()).device
    keep_logits = len(pairs) * max_length * model.num_exits * model.vocab_size * 4 <= MAX_LOGIT_BYTES
    confidence, prediction, label_list, logits_kept = [], [], [], []
    for start in tqdm(range(0, len(pairs), batch_size), desc="calibration tokens", mininterval=5, disable=quiet):
        chunk = pairs[start:start + batch_size]
        inputs, targets = batch_tensors([p[1] for p in chunk], tokenizer.bos_id, tokenizer.eos_id,
                                        tokenizer.pad_id, max_length)
        rows = images[torch.tensor([p[0] for p in chunk])].to(device)
        features = model.project(rows) if encoded else model.encode(rows)
        mask = (targets != -100).to(device)
        flat = model.forward_exits(features, inputs.to(device))[:, mask].float()  # [M, n, V]
        prob, pred = flat.softmax(-1).max(-1)
        confidence.append(prob.cpu())
        prediction.append(pred.cpu())
        label_list.append(pred[-1].cpu() if labels == "full_model" else targets[targets != -100])
        if keep_logits:
            logits_kept.append(flat.cpu())
    if not confidence:
        raise CalibrationError("calibration: the calibration split has no captions")
    return ExitStatistics(torch.cat(label_list), list(model.exits), model.vocab_size,
                          torch.cat(logits_kept, 1) if keep_logits else None,
                          torch.cat(confidence, 1), torch.cat(prediction, 1))


def encode_frozen(model: Captioner, images: torch.Tensor, batch_size: int = 32, quiet: bool = False) -> torch.Tensor:
    """A frozen encoder's outputs [N, P, D] (before the trained projection) for images [N, 3, S, S], on CPU."""
    device = next(model.parameters()).device
    chunks = []
    with torch.no_grad():
        for start in tqdm(range(0, images.shape[0], batch_size), desc="encode (frozen)", disable=quiet, leave=False):
            chunks.append(model.encoder(images[start:start + batch_size].to(device)).cpu())
    return torch.cat(chunks)


def _load_args(recipe: dict) -> dict:
    norm = image_norm(recipe)
    return {"image_size": norm["image_size"], "mean": norm["mean"], "std": norm["std"]}
