"""GLUE tasks from a local folder in the original ``download_glue_data.py`` TSV layout, or the hub.

Local layout: ``<path>/<TASK>/train.tsv`` and ``dev.tsv`` (MNLI: ``dev_matched.tsv``), TASK one of
SST-2, CoLA, MRPC, QQP, STS-B, MNLI, QNLI, RTE, WNLI. ``stsb_binary`` is STS-B as a sentence-pair
classification task (similar: score >= 3.0 of 5, "roughly equivalent" in the annotation guide),
a pair task larger than MRPC and RTE built from the offline data. GLUE's test labels are hidden, so mmexit
reports on the dev set ("test" split) and carves its calibration split out of train.
A malformed row raises DataError naming the file and line.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mmexit.data.examples import TextExample, TextTask, deterministic_split, limit
from mmexit.errors import DataError



@dataclass(frozen=True)
class GlueFormat:
    """Where a task's columns are. Indices into the TSV row; header: whether line 1 is a header."""

    folder: str
    text_a: int
    text_b: Optional[int]
    label: int
    labels: tuple[str, ...]  # empty: regression
    header: bool = True
    dev_file: str = "dev.tsv"
    metrics: tuple[str, ...] = ("accuracy",)
    primary: str = "accuracy"
    hub_columns: tuple[str, Optional[str]] = ("sentence", None)
    binarize_at: Optional[float] = None  # a score column turned into labels 0/1 (score >= binarize_at -> 1)
    hub_config: Optional[str] = None  # the glue config on the hub when it is not the task's name


#: longest text accepted in a data row (characters); the csv module's field limit is set to it
MAX_TEXT_CHARS = 100_000
csv.field_size_limit(MAX_TEXT_CHARS + 1)

GLUE_FORMATS: dict[str, GlueFormat] = {
    "sst2": GlueFormat("SST-2", 0, None, 1, ("0", "1")),
    "cola": GlueFormat("CoLA", 3, None, 1, ("0", "1"), header=False, metrics=("mcc", "accuracy"), primary="mcc"),
    "mrpc": GlueFormat("MRPC", 3, 4, 0, ("0", "1"), metrics=("accuracy", "f1"),
                       hub_columns=("sentence1", "sentence2")),
    "qqp": GlueFormat("QQP", 3, 4, 5, ("0", "1"), metrics=("accuracy", "f1"),
                      hub_columns=("question1", "question2")),
    "stsb": GlueFormat("STS-B", 7, 8, 9, (), metrics=("pearson", "spearman"), primary="pearson",
                       hub_columns=("sentence1", "sentence2")),
    "stsb_binary": GlueFormat("STS-B", 7, 8, 9, ("dissimilar", "similar"), binarize_at=3.0,
                              hub_columns=("sentence1", "sentence2"), hub_config="stsb"),
    "mnli": GlueFormat("MNLI", 8, 9, -1, ("contradiction", "entailment", "neutral"),
                       dev_file="dev_matched.tsv", hub_columns=("premise", "hypothesis")),
    "qnli": GlueFormat("QNLI", 1, 2, 3, ("entailment", "not_entailment"), hub_columns=("question", "sentence")),
    "rte": GlueFormat("RTE", 1, 2, 3, ("entailment", "not_entailment"), hub_columns=("sentence1", "sentence2")),
    "wnli": GlueFormat("WNLI", 1, 2, 3, ("0", "1"), hub_columns=("sentence1", "sentence2")),
}


def read_glue_tsv(path: Path, spec: GlueFormat) -> list[TextExample]:
    """Parse one GLUE TSV file; every row must have the task's columns and a valid label."""
    if not path.is_file():
        raise DataError(f"{path}: GLUE file not found (expected the original GLUE TSV layout)")
    examples = []
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[error.start]:02x}); save the file as UTF-8") from None
    with io.StringIO(text, newline="") as stream:
        reader = csv.reader(stream, delimiter="\t", quoting=csv.QUOTE_NONE)
        header_columns = None
        line_number = 0
        try:
            for line_number, row in enumerate(reader, start=1):
                if line_number == 1 and spec.header:
                    header_columns = len(row)
                    continue
                if not row or row == [""]:
                    continue
                needed = max(spec.text_a, spec.text_b or 0, spec.label if spec.label >= 0 else 0) + 1
                if len(row) < needed or (header_columns and len(row) != header_columns):
                    raise DataError(f"{path}:{line_number}: expected {header_columns or needed} tab-separated "
                                    f"columns, found {len(row)}")
                examples.append(_example(row, spec, path, line_number))
        except csv.Error as error:
            raise DataError(f"{path}:{line_number + 1}: {error} (a row longer than {MAX_TEXT_CHARS:,} "
                            "characters, or a malformed line)") from None
    if not examples:
        raise DataError(f"{path}: no data rows")
    return examples


def _example(row: list[str], spec: GlueFormat, path: Path, line_number: int) -> TextExample:
    raw = row[spec.label].strip()
    if spec.binarize_at is not None:
        label: int | float = _binarized(_score(raw, path, line_number), spec)
    elif spec.labels:
        if raw not in spec.labels:
            raise DataError(f"{path}:{line_number}: label {raw!r} is not one of {', '.join(spec.labels)}")
        label = spec.labels.index(raw)
    else:
        label = _score(raw, path, line_number)
    text_b = row[spec.text_b] if spec.text_b is not None else None
    for text in (row[spec.text_a], text_b or ""):
        if len(text) > MAX_TEXT_CHARS:
            raise DataError(f"{path}:{line_number}: a text of {len(text):,} characters (at most "
                            f"{MAX_TEXT_CHARS:,}; longer inputs are cut to model.max_length tokens anyway)")
    return TextExample(row[spec.text_a], text_b, label)


def _score(raw: str, path: Path, line_number: int) -> float:
    try:
        return float(raw)
    except ValueError:
        raise DataError(f"{path}:{line_number}: score {raw!r} is not a number") from None


def _binarized(score: float, spec: GlueFormat) -> int:
    return int(score >= spec.binarize_at)


def load_glue_tsv(task: str, folder: str | Path, calibration_fraction: float, seed: int,
                  max_train: int | None = None, max_eval: int | None = None) -> TextTask:
    """train.tsv -> train + calib (held out, seeded); dev -> test."""
    spec = GLUE_FORMATS[task]
    root = Path(folder) / spec.folder
    if not root.is_dir():
        raise DataError(f"data.path: {folder} has no {spec.folder}/ folder (expected {root}/train.tsv)")
    train = read_glue_tsv(root / "train.tsv", spec)
    dev = read_glue_tsv(root / spec.dev_file, spec)
    parts = deterministic_split(train, {"calib": calibration_fraction}, seed)
    splits = {
        "train": limit(parts["train"], max_train, seed),
        "calib": limit(parts["calib"], max_eval, seed),
        "test": limit(dev, max_eval, seed),
    }
    return TextTask(task, splits, list(spec.labels), spec.metrics, spec.primary,
                    {"source": "glue_tsv", "folder": str(root), "test_is": spec.dev_file})


def load_glue_hub(task: str, calibration_fraction: float, seed: int,
                  max_train: int | None = None, max_eval: int | None = None) -> TextTask:
    """GLUE from the Hugging Face hub with ``datasets`` (needs the package and the network)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError("data.source: glue_hub needs the 'datasets' package (pip install datasets)") from None
    spec = GLUE_FORMATS[task]
    try:
        dataset = load_dataset("glue", spec.hub_config or task)
    except Exception as error:  # network errors come in many types
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"data.source: cannot load glue/{task} from the hub (offline? use glue_tsv): {first}") from None
    column_a, column_b = spec.hub_columns

    def label(value) -> int | float:
        if spec.binarize_at is not None:
            return _binarized(float(value), spec)
        return int(value) if spec.labels else float(value)

    def convert(split) -> list[TextExample]:
        return [TextExample(row[column_a], row[column_b] if column_b else None, label(row["label"])) for row in split]

    dev_split = "validation_matched" if task == "mnli" else "validation"
    parts = deterministic_split(convert(dataset["train"]), {"calib": calibration_fraction}, seed)
    splits = {
        "train": limit(parts["train"], max_train, seed),
        "calib": limit(parts["calib"], max_eval, seed),
        "test": limit(convert(dataset[dev_split]), max_eval, seed),
    }
    return TextTask(task, splits, list(spec.labels), spec.metrics, spec.primary, {"source": "glue_hub"})
