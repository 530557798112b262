"""COCO caption metrics through pycocoevalcap: BLEU-1..4, METEOR, ROUGE-L, CIDEr (+ SPICE on request).

With ``java`` on PATH the captions are tokenized by pycocoevalcap's PTB tokenizer (Stanford
CoreNLP, as ``COCOEvalCap`` does) and the scores equal ``COCOEvalCap``'s on the same files.
Without java: one warning, METEOR (and SPICE) skipped, and a Python tokenizer stands in:
lower-case, split off the punctuation PTB would split, and drop the tokens PTB's wrapper drops
(``PTB_PUNCTUATION``). On plain captions it gives the same tokens; on unusual punctuation
(quotes, brackets, contractions) scores may differ slightly from the PTB path.

Results files use the COCO results format: ``[{"image_id": int, "caption": str}, ...]``.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

from mmexit.errors import DataError

PTB_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                   "--", "...", ";"}
ALL_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
_SPLIT = re.compile(r"\.\.\.|--|[.,!?;:()\[\]{}\"`]|'s\b|n't\b|'|\w+(?:-\w+)*|\S")


def java_available() -> bool:
    return shutil.which("java") is not None


def python_tokenize(captions: dict) -> dict:
    """{id: [{"caption": str}]} -> {id: [tokenized str]}: the java-free stand-in for PTBTokenizer."""
    out = {}
    for key, items in captions.items():
        out[key] = [" ".join(t for t in _SPLIT.findall(item["caption"].lower().replace("\n", " "))
                             if t not in PTB_PUNCTUATION) for item in items]
    return out


def tokenize(captions: dict, use_java: bool) -> dict:
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize(captions)
    return python_tokenize(captions)


def score_tokenized(gts: dict, res: dict, metrics: tuple[str, ...], use_java: bool) -> dict[str, float]:
    """Scores of already tokenized {id: [str]} references and predictions (one prediction per id)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    scores: dict[str, float] = {}
    if any(m.startswith("Bleu") for m in metrics):
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        for n, value in enumerate(bleu, start=1):
            if f"Bleu_{n}" in metrics:
                scores[f"Bleu_{n}"] = float(value)
    if "METEOR" in metrics and use_java:
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
        scores["METEOR"] = float(meteor.compute_score(gts, res)[0])
        del meteor
    if "ROUGE_L" in metrics:
        scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in metrics:
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if "SPICE" in metrics and use_java:
        from pycocoevalcap.spice.spice import Spice

        try:
            scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
        except Exception as error:  # CoreNLP models are downloaded at first use
            warnings.warn("SPICE skipped: its Stanford CoreNLP models could not be fetched or run "
                          f"(offline? {error.__class__.__name__}); the other metrics are unaffected")
    return scores


class CaptionScorer:
    """Scores predictions against fixed references; references are tokenized once.

    references: {image_id: [caption, ...]}. ``metrics`` defaults to BLEU-1..4, METEOR, ROUGE-L,
    CIDEr; add "SPICE" to ask for SPICE. ``use_java`` None = use java when on PATH.
    """

    def __init__(self, references: dict[int, list[str]], metrics: tuple[str, ...] | None = None,
                 use_java: bool | None = None) -> None:
        self.metrics = tuple(metrics or ALL_METRICS[:-1])
        unknown = [m for m in self.metrics if m not in ALL_METRICS]
        if unknown:
            raise ValueError(f"unknown caption metric {unknown[0]!r}; allowed: {', '.join(ALL_METRICS)}")
        self.use_java = java_available() if use_java is None else use_java
        if not self.use_java and java_available() is False:
            warnings.warn("java is not on PATH: METEOR and SPICE are skipped and captions are tokenized by "
                          "mmexit's Python tokenizer instead of the PTB tokenizer (BLEU, ROUGE-L, CIDEr still computed)")
        for image_id, captions in references.items():
            if not captions:
                raise DataError(f"image id {image_id} has no reference captions")
        self.references = references
        self.gts = tokenize({k: [{"caption": c} for c in v] for k, v in references.items()}, self.use_java)

    def score(self, predictions: dict[int, str], metrics: tuple[str, ...] | None = None) -> dict[str, float]:
        """predictions: {image_id: caption} for every reference image (extra ids are an error)."""
        missing = [k for k in self.references if k not in predictions]
        if missing:
            raise DataError(f"no predicted caption for image id {missing[0]} ({len(missing)} missing)")
        extra = [k for k in predictions if k not in self.references]
        if extra:
            raise DataError(f"predicted caption for image id {extra[0]}, which has no reference captions")
        res = tokenize({k: [{"caption": predictions[k]}] for k in self.references}, self.use_java)
        scores = score_tokenized(self.gts, res, tuple(metrics or self.metrics), self.use_java)
        # a near-constant captioner can score a fair BLEU: how many different captions it wrote
        scores["distinct_captions"] = len({predictions[k].strip().lower() for k in self.references})
        return scores


def write_results_file(predictions: dict[int, str], path: str | Path) -> Path:
    """Predictions in the COCO results format: [{"image_id": int, "caption": str}, ...]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"image_id": int(k), "caption": v} for k, v in predictions.items()]))
    return path


def write_annotation_file(references: dict[int, list[str]], path: str | Path) -> Path:
    """References in the COCO caption annotation format (what ``COCO(...)`` reads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [{"id": int(k)} for k in references]
    annotations = []
    for image_id, captions in references.items():
        for caption in captions:
            annotations.append({"id": len(annotations), "image_id": int(image_id), "caption": caption})
    path.write_text(json.dumps({"images": images, "annotations": annotations, "type": "captions",
                                "info": {}, "licenses": []}))
    return path


def score_files(annotation_file: str | Path, results_file: str | Path, metrics: tuple[str, ...] | None = None,
                use_java: bool | None = None) -> dict[str, float]:
    """COCO metrics of a results file against an annotation file (the images of the results)."""
    try:
        annotation = json.loads(Path(annotation_file).read_text())
        results = json.loads(Path(results_file).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read caption files: {error}") from None
    if not isinstance(results, list) or not all(isinstance(r, dict) and "image_id" in r and "caption" in r for r in results):
        raise DataError(f"{results_file}: not a COCO results file (a list of {{image_id, caption}})")
    references: dict[int, list[str]] = {}
    for item in annotation.get("annotations", []):
        references.setdefault(int(item["image_id"]), []).append(item["caption"])
    predictions = {int(r["image_id"]): r["caption"] for r in results}
    references = {k: references.get(k, []) for k in predictions}
    return CaptionScorer(references, metrics, use_java).score(predictions)
