"""COCO metrics: ours on a results file == pycocoevalcap's COCOEvalCap run directly on the same files."""

from __future__ import annotations

import contextlib
import json
import io
import random
import shutil

import pytest

from mmexit.evaluation.caption_metrics import (CaptionScorer, python_tokenize, score_files, write_annotation_file,
                                       write_results_file)

REFERENCES = {
    i: [f"a {c} {s} to the left of a {c2} circle", f"there is a {c} {s} in the picture", f"a {s} and a circle",
        f"two shapes : a {c} {s} , and a {c2} circle"]
    for i, (c, s, c2) in enumerate([("red", "square", "blue"), ("green", "triangle", "red"), ("blue", "square", "yellow"),
                                    ("yellow", "circle", "green"), ("purple", "triangle", "orange"),
                                    ("orange", "square", "purple")], start=10)
}


def _predictions() -> dict[int, str]:
    rng = random.Random(0)
    return {i: rng.choice(refs[:2]) + (" ." if i % 2 else "") for i, refs in REFERENCES.items()}


@pytest.mark.skipif(shutil.which("java") is None, reason="java is not on PATH: the PTB tokenizer and METEOR need it")
def test_metrics_equal_cocoevalcap(tmp_path, monkeypatch):
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    annotation = write_annotation_file(REFERENCES, tmp_path / "ann.json")
    results = write_results_file(_predictions(), tmp_path / "res.json")
    ours = score_files(annotation, results)

    class NoSpice:  # SPICE downloads CoreNLP models (offline here); compared separately it is opt-in
        def method(self):
            return "SPICE"

        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(annotation))
        result = coco.loadRes(str(results))
        evaluator = coco_eval.COCOEvalCap(coco, result)
        evaluator.params["image_id"] = result.getImgIds()
        evaluator.evaluate()
    expected = {k: float(v) for k, v in evaluator.eval.items() if k != "SPICE"}
    # mmexit adds the count of different captions (a near-constant captioner can score a fair BLEU)
    assert ours.pop("distinct_captions") == len({r["caption"].strip().lower() for r in json.loads(results.read_text())})
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key


def test_without_java_skips_meteor_and_still_scores(tmp_path, monkeypatch):
    import mmexit.evaluation.caption_metrics as metrics

    monkeypatch.setattr(metrics, "java_available", lambda: False)
    with pytest.warns(UserWarning, match="java is not on PATH: METEOR and SPICE are skipped"):
        scorer = CaptionScorer(REFERENCES)
    scores = scorer.score(_predictions())
    assert "METEOR" not in scores and {"Bleu_4", "ROUGE_L", "CIDEr"} <= set(scores)
    assert scores["CIDEr"] > 0


def test_python_tokenizer_matches_ptb_on_plain_captions():
    tokens = python_tokenize({1: [{"caption": "Two shapes: a Red square, and a blue circle."}]})
    assert tokens == {1: ["two shapes a red square and a blue circle"]}
