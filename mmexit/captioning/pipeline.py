"""The captioning run: data -> train -> calibrate -> evaluate -> report (``run_captioning``).

Every data input is loaded and checked before anything is written into the output folder.
Evaluation, per rule: a sweep over operating points on (a subset of) the calibration split with
the real early-exit decoder (layer counts measured; plus, optionally, the oracle mode, labelled
simulated), the operating point chosen there (fastest within ``evaluate.tolerance`` of the full
model's CIDEr), then the test split decoded at that point and timed against the full model at
each ``timing_batch_sizes`` (BENCHMARKS.md protocol: same process, alternating, median).
``wall_speedup`` is per generated token (time / row-steps decoded), matching the per-token layer
speed-up even when the two paths write captions of different lengths; ``wall_speedup_total``
is the plain time ratio. The timer
covers the decoder path only (cross-attention K/V, layers, heads, search); the image encoder is
timed on its own and reported as ``encoder_ms`` per image.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmexit.captioning.calibration import collect_statistics, fit_rule
from mmexit.captioning.coco_data import CaptionItem, check_items, load_coco_annotations, load_images, load_karpathy
from mmexit.captioning.decoding import DecodeResult, beam_decode, greedy_decode
from mmexit.captioning.metrics import CaptionScorer, write_results_file
from mmexit.captioning.model import build_captioner, load_captioner, save_captioner
from mmexit.captioning.tokenizer import load_pretrained_tokenizer, load_word_tokenizer, train_word_tokenizer
from mmexit.config import build_component, save_recipe
from mmexit.errors import DataError, ModelLoadError, RecipeError
from mmexit.evaluation.results import atomic_write_text, write_results
from mmexit.evaluation.speed import efficiency, exit_histogram, layer_speedup
from mmexit.evaluation.timing import machine_info, time_alternating


# ----------------------------------------------------------------------------------------- data
def load_splits(recipe: dict) -> dict[str, list[CaptionItem]]:
    """The train / calib / test items the recipe names, checked (images exist and decode)."""
    data = recipe["data"]
    source = data["source"]
    if source == "scenes":
        from mmexit.captioning.scenes import generate_scenes

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
    chosen = {}
    for role, limit in (("train", "max_train_images"), ("calib", "max_calib_images"), ("test", "max_test_images")):
        name = data[f"{role}_split"]
        if name not in splits:
            raise DataError(f"data: split {name!r} (data.{role}_split) not found; the data has {sorted(splits)}")
        items = splits[name][: data[limit]] if data[limit] else splits[name]
        if not items:
            raise DataError(f"data: split {name!r} has no images")
        chosen[role] = items
    for items in chosen.values():
        check_items(items, data["verify_images"])
    return chosen


def _references(items: list[CaptionItem]) -> dict[int, list[str]]:
    return {item.image_id: item.captions for item in items}


# ---------------------------------------------------------------------------------------- model
def _model_folder(recipe: dict, output_dir: Path) -> Path:
    init = recipe["model"]["init_from"]
    if init:
        folder = Path(init)
        return folder / "model" if (folder / "model").is_dir() else folder
    return output_dir / "model"


def _load_tokenizer(recipe: dict, folder: Path):
    if recipe["tokenizer"]["type"] == "pretrained":
        return load_pretrained_tokenizer(recipe["tokenizer"]["name"])
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: no tokenizer.json (train first, or set model.init_from to a trained run)")
    return load_word_tokenizer(path)


def _spec(recipe: dict, tokenizer) -> dict:
    model = recipe["model"]
    return {
        "encoder": dict(model["encoder"], kwargs=dict(model["encoder"]["kwargs"] or {})),
        "decoder": {"pretrained": model["decoder"]["pretrained"], "config": dict(model["decoder"]["config"] or {})},
        "vocab_size": tokenizer.vocab_size,
        "special_ids": {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id},
        "exits": model["exits"],
        "exit_head": model["exit_head"],
        "image_size": model["image_size"],
    }


# ------------------------------------------------------------------------------------- decoding
def _decode(model, features: torch.Tensor, rule, recipe: dict, batch_size: int, tokenizer,
            policy: str | None = None) -> DecodeResult:
    """Decode features [N, P, d] in batches; merged DecodeResult."""
    evaluate = recipe["evaluate"]
    policy = policy or evaluate["policy"]
    tokens, layers, exits, token_layers, catchup, step_layers = [], [], [], [], 0, []
    for start in range(0, features.shape[0], batch_size):
        batch = features[start:start + batch_size]
        if evaluate["decoding"] == "beam":
            result = beam_decode(model, batch, rule, evaluate["beam_size"], evaluate["max_len"], tokenizer.bos_id,
                                 tokenizer.eos_id, evaluate["length_penalty"], policy)
        else:
            result = greedy_decode(model, batch, rule, evaluate["max_len"], tokenizer.bos_id, tokenizer.eos_id, policy)
        tokens += result.tokens
        token_layers += result.token_layers
        layers.append(result.layers)
        exits.append(result.exit_index)
        catchup += result.catchup_layers
        step_layers += result.step_layers
    return DecodeResult(tokens, torch.cat(layers), torch.cat(exits), token_layers, simulated=policy == "oracle",
                        catchup_layers=catchup, step_layers=step_layers)


@torch.inference_mode()
def _encode(model, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    return torch.cat([model.encode(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)])


def _row(method: str, rule_label: str, point, split: str, metrics: dict, result: DecodeResult, model,
         batch_size, simulated: bool, **extra) -> dict:
    row = {
        "method": method, "rule": rule_label, "operating_point": point, "split": split, "metrics": metrics,
        "primary_metric": "CIDEr",
        "layer_speedup": layer_speedup(result.layers, model.num_layers),
        "wall_speedup": None, "efficiency": None, "batch_size": batch_size,
        "exit_histogram": exit_histogram(result.exit_index, model.exits), "simulated": simulated,
    }
    if result.step_layers:  # layer calls: a batch's step costs its deepest row's layers when calls are row-bound
        row["call_speedup"] = layer_speedup(torch.tensor(result.step_layers), model.num_layers)
    if result.catchup_layers:  # deferred compute: earlier positions' layers run later, in chunks
        computed = int(result.layers.sum()) + result.catchup_layers
        row["catchup_layers"] = result.catchup_layers
        row["compute_speedup"] = model.num_layers * result.layers.numel() / max(computed, 1)
    row.update(extra)
    return row


def _captions(result: DecodeResult, items: list[CaptionItem], tokenizer) -> dict[int, str]:
    return {item.image_id: tokenizer.decode(ids) for item, ids in zip(items, result.tokens)}


# ------------------------------------------------------------------------------------- the run
def run_captioning(recipe: dict, accelerator, output_dir: Path) -> list[dict]:
    """Run the stages of ``recipe["run"]["stages"]``; return the result rows (see results.py)."""
    output_dir = Path(output_dir)
    stages = recipe["run"]["stages"]
    device = accelerator.device
    splits = load_splits(recipe)  # all data checked before anything is written
    if accelerator.is_main_process:
        save_recipe(recipe, output_dir / "recipe.yaml")
    folder = _model_folder(recipe, output_dir)
    size = recipe["model"]["image_size"]
    norm = dict(mean=tuple(recipe["model"]["image_mean"]), std=tuple(recipe["model"]["image_std"]))

    if "train" in stages:
        train_items = splits["train"]
        if recipe["tokenizer"]["type"] == "word":
            tokenizer = train_word_tokenizer([c for item in train_items for c in item.captions],
                                             recipe["tokenizer"]["min_frequency"])
        else:
            tokenizer = load_pretrained_tokenizer(recipe["tokenizer"]["name"])
        model = build_captioner(_spec(recipe, tokenizer)).to(device)
        images = load_images(train_items, size, **norm, progress=True)
        captions = [[tokenizer.encode(c) for c in item.captions] for item in train_items]
        from mmexit.captioning.training import train_captioner

        history = train_captioner(model, images, captions, tokenizer, recipe["train"], accelerator,
                                  seed=recipe["run"]["seed"])
        model = accelerator.unwrap_model(model)
        folder = output_dir / "model"
        save_captioner(model, folder)
        if recipe["tokenizer"]["type"] == "word":
            tokenizer.save(folder / "tokenizer.json")
        atomic_write_text(output_dir / "train_log.json", json.dumps(history))
        del images
    else:
        tokenizer = _load_tokenizer(recipe, folder)
        model = load_captioner(folder).to(device)
    model.eval()

    rules = []
    for index, spec in enumerate(recipe["evaluate"]["rules"]):
        rule = build_component(spec, "rule", f"evaluate.rules[{index}]", reserved=("sweep", "calibration"))
        rules.append((spec, rule))

    calib_items = splits["calib"][: recipe["calibration"]["max_images"] or None]
    calibration_path = output_dir / "calibration.json"
    if "calibrate" in stages:
        calibration_state = {}
        needed = [(spec, rule) for spec, rule in rules if spec.get("calibration")]
        if needed:
            calib_images = load_images(calib_items, size, **norm)
            captions = [[tokenizer.encode(c) for c in item.captions] for item in calib_items]
            stats = collect_statistics(model, calib_images, captions, tokenizer, recipe["calibration"]["labels"],
                                       max_length=recipe["train"]["max_length"], device=device)
            for index, (spec, rule) in enumerate(rules):
                if spec.get("calibration"):
                    calibration = build_component(spec["calibration"], "calibration",
                                                  f"evaluate.rules[{index}].calibration")
                    fit_rule(rule, calibration, stats, model.exits, model.decoder.config.vocab_size)
                calibration_state[f"{index}:{rule.name}"] = rule.calibration_state()
        atomic_write_text(calibration_path, json.dumps(calibration_state, indent=2))
    else:
        source = calibration_path if calibration_path.is_file() else folder.parent / "calibration.json"
        if source.is_file():
            state = json.loads(source.read_text())
            for index, (spec, rule) in enumerate(rules):
                if f"{index}:{rule.name}" in state:
                    rule.load_calibration_state(state[f"{index}:{rule.name}"])

    rows: list[dict] = []
    if "evaluate" in stages:
        rows = evaluate(recipe, model, tokenizer, rules, splits, output_dir, device)
        atomic_write_text(output_dir / "rows.json", json.dumps(rows, indent=2))
    elif (output_dir / "rows.json").is_file():
        rows = json.loads((output_dir / "rows.json").read_text())
    if "report" in stages and rows:
        title = f"{recipe['run']['name']}: captioning early exit ({recipe['data']['source']})"
        paths = write_results(output_dir, recipe, rows, machine_info(), title)
        examples = output_dir / "examples.md"
        if examples.is_file():
            atomic_write_text(paths["markdown"], paths["markdown"].read_text() + "\n" + examples.read_text())
    return rows


def evaluate(recipe: dict, model, tokenizer, rules, splits, output_dir: Path, device) -> list[dict]:
    """Sweeps on the calibration split, chosen points on the test split, timing; the result rows."""
    evaluate_cfg = recipe["evaluate"]
    size = recipe["model"]["image_size"]
    norm = dict(mean=tuple(recipe["model"]["image_mean"]), std=tuple(recipe["model"]["image_std"]))
    batch = evaluate_cfg["batch_size"]
    metrics = tuple(evaluate_cfg["metrics"])
    sweep_items = splits["calib"][: evaluate_cfg["sweep_max_images"] or None]
    test_items = splits["test"]
    sweep_features = _encode(model, load_images(sweep_items, size, **norm).to(device))
    test_images = load_images(test_items, size, **norm).to(device)
    test_features = _encode(model, test_images)
    # sweeps: BLEU-4 and CIDEr with the Python tokenizer (no java start per point); test rows: PTB
    sweep_scorer = CaptionScorer(_references(sweep_items), ("Bleu_4", "CIDEr"), use_java=False)
    test_scorer = CaptionScorer(_references(test_items), metrics)
    rows: list[dict] = []
    predictions_dir = output_dir / "predictions"

    # full model on the sweep split: the reference point of the operating-point choice
    full_sweep = _decode(model, sweep_features, None, recipe, batch, tokenizer)
    full_sweep_cider = sweep_scorer.score(_captions(full_sweep, sweep_items, tokenizer))["CIDEr"]
    rows.append(_row("full", "full", None, "calib", sweep_scorer.score(_captions(full_sweep, sweep_items, tokenizer)),
                     full_sweep, model, batch, False))
    chosen = []
    for index, (spec, rule) in enumerate(rules):
        points = spec.get("sweep") or rule.default_sweep()
        candidates = []
        for point in points:
            variant = rule.with_threshold(point)
            result = _decode(model, sweep_features, variant, recipe, batch, tokenizer)
            scores = sweep_scorer.score(_captions(result, sweep_items, tokenizer))
            row = _row(variant.name, variant.describe(), point, "calib", scores, result, model, batch, False)
            if getattr(variant, "warning", None):
                row["warning"] = variant.warning
            rows.append(row)
            candidates.append((row, variant))
            if evaluate_cfg["oracle_sweep"] and evaluate_cfg["policy"] != "oracle":
                oracle = _decode(model, sweep_features, variant, recipe, batch, tokenizer, policy="oracle")
                rows.append(_row(f"{variant.name} (oracle)", variant.describe(), point, "calib",
                                 sweep_scorer.score(_captions(oracle, sweep_items, tokenizer)), oracle, model, None,
                                 True))
        good = [c for c in candidates if c[0]["metrics"]["CIDEr"] >= (1 - evaluate_cfg["tolerance"]) * full_sweep_cider]
        note = None
        if not good:
            good = [max(candidates, key=lambda c: c[0]["metrics"]["CIDEr"])]
            note = (f"no operating point within {evaluate_cfg['tolerance']:.0%} of the full model's calibration "
                    "CIDEr; the most accurate one is used")
        best = max(good, key=lambda c: (c[0]["layer_speedup"], c[0]["metrics"]["CIDEr"]))
        chosen.append((best[1], note))

    # the test split: full model and chosen points, quality at `batch`, timing at each batch size
    full_test = _decode(model, test_features, None, recipe, batch, tokenizer)
    full_captions = _captions(full_test, test_items, tokenizer)
    write_results_file(full_captions, predictions_dir / "full_test.json")
    full_metrics = test_scorer.score(full_captions)
    examples = {"full": full_captions}
    test_results = []
    for rule, note in chosen:
        result = _decode(model, test_features, rule, recipe, batch, tokenizer)
        captions = _captions(result, test_items, tokenizer)
        write_results_file(captions, predictions_dir / f"{rule.describe().replace('/', '_')}_test.json")
        examples[rule.describe()] = captions
        test_results.append((rule, note, result, test_scorer.score(captions)))

    timed = _time_points(recipe, model, tokenizer, test_images, [r for r, *_ in test_results])
    for batch_size in evaluate_cfg["timing_batch_sizes"]:
        info = timed[batch_size]
        rows.append(_row("full", "full", None, "test", full_metrics, full_test, model, batch_size, False,
                         wall_speedup=1.0, efficiency=1.0, time_full_s=info["full"], encoder_ms=info["encoder_ms"],
                         timed_images=info["images"]))
        for position, (rule, note, result, scores) in enumerate(test_results):
            key = f"exit{position}"
            # per generated (row-step) token, so captions of different lengths compare fairly
            wall = (info["full"] / info["full_tokens"]) / (info[key] / info[f"{key}_tokens"])
            row = _row(rule.name, rule.describe(), rule.threshold, "test", scores, result, model, batch_size, False,
                       wall_speedup=wall, efficiency=efficiency(wall, info[f"{key}_layer_speedup"]),
                       timed_layer_speedup=info[f"{key}_layer_speedup"], call_speedup=info[f"{key}_call_speedup"],
                       call_efficiency=wall / info[f"{key}_call_speedup"], time_full_s=info["full"],
                       time_exit_s=info[key], encoder_ms=info["encoder_ms"], timed_images=info["images"],
                       timed_tokens_full=info["full_tokens"], timed_tokens_exit=info[f"{key}_tokens"],
                       wall_speedup_total=info["full"] / info[key])
            warning = "; ".join(w for w in (note, getattr(rule, "warning", None)) if w)
            if warning:
                row["warning"] = warning
            rows.append(row)
    _write_examples(output_dir, test_items, examples, test_results, model, evaluate_cfg["examples"])
    return rows


def _time_points(recipe: dict, model, tokenizer, images: torch.Tensor, rules: list) -> dict:
    """Per batch size: median seconds of the full and each early-exit decoder over the same images."""
    evaluate_cfg = recipe["evaluate"]
    out = {}
    for batch_size in evaluate_cfg["timing_batch_sizes"]:
        count = evaluate_cfg["timing_images"] if batch_size > 1 else max(4, evaluate_cfg["timing_images"] // 4)
        subset = images[:count]
        with torch.inference_mode():
            encoder_time = time_alternating({"encoder": lambda: _encode(model, subset, batch_size)},
                                            evaluate_cfg["timing_repeats"], warmup=1)["encoder"]
            features = _encode(model, subset)
        info = {"images": int(subset.shape[0]), "encoder_ms": 1000 * encoder_time / subset.shape[0]}
        candidates = {"full": lambda: _decode(model, features, None, recipe, batch_size, tokenizer)}
        info["full_tokens"] = int(candidates["full"]().layers.numel())
        for position, rule in enumerate(rules):
            candidates[f"exit{position}"] = (lambda r=rule: _decode(model, features, r, recipe, batch_size, tokenizer))
            result = candidates[f"exit{position}"]()
            info[f"exit{position}_layer_speedup"] = layer_speedup(result.layers, model.num_layers)
            info[f"exit{position}_call_speedup"] = layer_speedup(torch.tensor(result.step_layers), model.num_layers)
            info[f"exit{position}_tokens"] = int(result.layers.numel())
        info.update(time_alternating(candidates, evaluate_cfg["timing_repeats"], warmup=1))
        out[batch_size] = info
    return out


def _write_examples(output_dir: Path, items, examples: dict, test_results, model, count: int) -> None:
    lines = ["## Example captions (test split)", ""]
    per_token = {rule.describe(): result for rule, _, result, _ in test_results}
    for item in items[:count]:
        lines.append(f"**image {item.image_id}** ({item.path.name})  ")
        lines.append(f"- references: {' | '.join(item.captions[:3])}  ")
        for label, captions in examples.items():
            extra = ""
            if label in per_token and per_token[label].token_layers:
                layers = per_token[label].token_layers[items.index(item)]
                extra = f" (layers per token: {layers})"
            lines.append(f"- {label}: {captions[item.image_id]}{extra}  ")
        lines.append("")
    atomic_write_text(output_dir / "examples.md", "\n".join(lines) + "\n")
    payload = {str(item.image_id): {"references": item.captions,
                                     **{label: captions[item.image_id] for label, captions in examples.items()}}
               for item in items[:count]}
    atomic_write_text(output_dir / "examples.json", json.dumps(payload, indent=2))
