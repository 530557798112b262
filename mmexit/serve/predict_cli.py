"""``mmexit predict RUN_DIR --text TEXT | --input FILE.jsonl|.tsv|.txt|IMAGE_FOLDER [--output OUT.jsonl]``.

Writes one JSON line per input (stdout, or ``--output`` atomically). Text inputs: ``--text`` (may
repeat; ``--text-pair`` for pair tasks), a JSONL file of ``{"text": ..., "text_pair": ...}`` rows,
a TSV with a header naming ``text`` (and ``text_pair``) columns, or a plain text file of one text
per line. Image inputs: ``--image`` (may repeat) or a folder of images (``.jpg``, ``.jpeg``, ``.png``);
``--plot FILE`` also draws them with the full model's and the rule's captions, words coloured by exit layer.
``--dtype`` (float32, bfloat16, float16 on a GPU, int8 on CPU) is the precision the model runs at;
default: the run's ``evaluate.dtype``, the precision its rules were calibrated at.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from mmexit.errors import DataError, MMExitError
from mmexit.evaluation.caption_plot import plot_token_layers, token_words
from mmexit.files import atomic_write_text
from mmexit.serve.load import load

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
#: photos one --plot figure shows (4 a row)
PLOT_MAX_PHOTOS = 48


def read_text_inputs(path: Path) -> list:
    """Texts (or {"text", "text_pair"} dicts) from a .jsonl, .tsv or one-per-line text file."""
    if not path.is_file():
        raise DataError(f"--input: file does not exist: {path}")
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start})") from None
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{number}: not a JSON line ({error.msg})") from None
            if isinstance(row, str) or (isinstance(row, dict) and isinstance(row.get("text"), str)):
                rows.append(row)
            else:
                raise DataError(f"{path}:{number}: expected a string or an object with a \"text\" string")
        return rows
    if path.suffix == ".tsv":
        reader = csv.DictReader(content.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE)
        if not reader.fieldnames or "text" not in reader.fieldnames:
            raise DataError(f"{path}:1: the header must name a 'text' column (and optionally 'text_pair')")
        return [{"text": row["text"], "text_pair": row.get("text_pair")} for row in reader]
    return [line for line in content.splitlines() if line.strip()]


def image_inputs(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"--input: no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
        return files
    if path.is_file():
        return [path]
    raise DataError(f"--input: no such file or folder: {path}")


def search_options(args) -> dict:
    """--beam-size, --length-penalty, --no-repeat-ngram as ``CaptionPredictor.caption`` keywords."""
    return {"beam_size": args.beam_size, "length_penalty": args.length_penalty,
            "no_repeat_ngram": args.no_repeat_ngram}


def plot_predictions(args, predictor, images: list[Path], results: list[dict]) -> None:
    """``--plot FILE``: the photos with the full model's captions and the run's rule's (when it is not
    the full model), every word coloured by its exit layer; the first ``PLOT_MAX_PHOTOS`` of them."""
    if len(images) > PLOT_MAX_PHOTOS:  # a taller figure than that is unreadable (and past Agg's limit)
        print(f"mmexit predict: --plot draws the first {PLOT_MAX_PHOTOS} of {len(images)} photos", file=sys.stderr)
        images, results = images[:PLOT_MAX_PHOTOS], results[:PLOT_MAX_PHOTOS]
    tokenizer = predictor.processor
    panels = [{} for _ in images]
    if predictor.operating_point != "full":
        full = load(args.run_dir, rule="full", device=args.device, dtype=args.dtype)
        captions = full.caption(images, batch_size=args.batch_size, **search_options(args))
        for panel, result in zip(panels, captions):
            panel["full"] = token_words(result["tokens"], result["layers"], tokenizer)
    for panel, result in zip(panels, results):
        panel[predictor.operating_point] = token_words(result["tokens"], result["layers"], tokenizer)
    plot_token_layers(images, panels, predictor.model.num_layers, args.plot)


def predict_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mmexit predict", description="Run a trained mmexit run on new inputs.")
    parser.add_argument("run_dir", help="a trained run's output folder")
    parser.add_argument("--text", action="append", default=[], help="a text to classify (may repeat)")
    parser.add_argument("--text-pair", action="append", default=[], help="second text of a pair (per --text)")
    parser.add_argument("--image", action="append", default=[], help="an image to caption (may repeat)")
    parser.add_argument("--input", help="a .jsonl/.tsv/.txt file of texts, or a folder of images")
    parser.add_argument("--output", help="write JSON lines here instead of stdout")
    parser.add_argument("--rule", help="operating point, e.g. maxprob@0.9, pcee@0.85 or full (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--plot", help="captioning: write a PNG of the photos (the first 48) with the full model's "
                                       "and the rule's captions, each word coloured by the decoder layer it left at")
    parser.add_argument("--beam-size", type=int, help="captioning: beam search with this many beams (1: greedy; "
                                                      "default: the run's evaluate.decoding)")
    parser.add_argument("--length-penalty", type=float, help="captioning, beam search: score / length ** this")
    parser.add_argument("--no-repeat-ngram", type=int, help="captioning, beam search: no repeated n-gram of this size")
    parser.add_argument("--dtype", help="float32, bfloat16, float16 (GPU) or int8 (CPU) (default: the run's "
                                        "evaluate.dtype, the precision its rules were calibrated at)")
    args = parser.parse_args(argv)
    try:
        predictor = load(args.run_dir, rule=args.rule, device=args.device, dtype=args.dtype)
        if predictor.task == "captioning":
            images = [Path(p) for p in args.image] + (image_inputs(Path(args.input)) if args.input else [])
            if not images:
                raise DataError("give --image PATH or --input IMAGE_FOLDER")
            captions = predictor.caption(images, batch_size=args.batch_size, progress=True, **search_options(args))
            results = [{"image": str(path), **result} for path, result in zip(images, captions)]
        else:
            if args.text_pair and len(args.text_pair) != len(args.text):
                raise DataError("--text-pair: give one per --text")
            texts = [{"text": t, "text_pair": p} for t, p in zip(args.text, args.text_pair)] if args.text_pair \
                else list(args.text)
            if args.input:
                texts += read_text_inputs(Path(args.input))
            if not texts:
                raise DataError("give --text TEXT or --input FILE")
            if args.plot:
                raise DataError("--plot: only for captioning runs (words coloured by exit layer)")
            if any(value is not None for value in search_options(args).values()):
                raise DataError("--beam-size, --length-penalty, --no-repeat-ngram: only for captioning runs")
            results = predictor.predict(texts, batch_size=args.batch_size)
            results = [{"text": t if isinstance(t, str) else t["text"], **r} for t, r in zip(texts, results)]
    except MMExitError as error:
        print(f"mmexit: error: {error}", file=sys.stderr)
        return error.exit_code
    lines = "".join(json.dumps({"operating_point": predictor.operating_point, **r}) + "\n" for r in results)
    if args.output:
        atomic_write_text(Path(args.output), lines)
    else:
        sys.stdout.write(lines)
    if args.plot:  # after the captions are out: a failed plot loses none of them
        try:
            plot_predictions(args, predictor, images, results)
        except MMExitError as error:
            print(f"mmexit: error: {error}", file=sys.stderr)
            return error.exit_code
        except OSError as error:
            print(f"mmexit: error: --plot: cannot write {args.plot}: {error.strerror or error}", file=sys.stderr)
            return 2
    return 0
