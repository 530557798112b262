"""Helpers shared by the top-level tests: tiny random multi-exit models and where ../shared lives.

(Not a conftest: tests/captioning has its own conftest.py, and two modules named conftest clash.)
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_GLUE = REPO.parent / "shared" / "data" / "glue"
#: special token ids of the tiny captioners of tests/captioning/conftest.py
CAPTION_BOS, CAPTION_EOS, CAPTION_PAD = 1, 2, 0
def one_torch_thread():
    """Body of an autouse fixture (``pytest.fixture(autouse=True)(one_torch_thread)``): torch on one
    thread for the test. Width-32 models gain nothing from a second thread and lose a lot when the
    cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(family: str = "bert", num_labels: int = 3, exits="all", seed: int = 0):
    """A 4-layer random encoder (hidden 32) with exits, in eval mode."""
    from mmexit.models.encoder import MultiExitEncoder
    from mmexit.models.loading import tiny_backbone

    torch.manual_seed(seed)
    return MultiExitEncoder(tiny_backbone(f"tiny:{family}"), num_labels, exits).eval()


def random_batch(batch: int = 32, seq: int = 16, seed: int = 1):
    """Random token ids with ragged padding: ([batch, seq], [batch, seq])."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 2000, (batch, seq), generator=generator)
    lengths = torch.randint(3, seq + 1, (batch,), generator=generator)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


TINY_RECIPE = """
task: text_classification
run: {output_dir: OUT, name: t, log_with: none}
model: {backbone: "tiny:bert", max_length: 32}
data: {source: glue_tsv, task: sst2, path: GLUE, max_train_samples: 16, max_eval_samples: 16}
train: {epochs: 1, batch_size: 8}
evaluate: {rules: [{name: maxprob}], timing_batch_sizes: [8], timing_samples: 8, timing_repeats: 1}
"""


def make_glue(root: Path, rows: int = 40) -> Path:
    """A tiny SST-2 folder in the GLUE TSV layout under ``root``; returns the GLUE root."""
    folder = root / "glue" / "SST-2"
    folder.mkdir(parents=True)
    lines = [f"{'good film' if i % 2 else 'bad film'} number {i} \t{i % 2}\n" for i in range(rows)]
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "".join(lines))
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + "".join(lines[:20]))
    return root / "glue"


def tiny_recipe(root: Path, glue: Path, extra: str = "", name: str = "recipe.yaml") -> Path:
    """A tiny text recipe (tiny:bert, SST-2 rows) writing into ``root/out``."""
    path = root / name
    path.write_text(TINY_RECIPE.replace("OUT", str(root / "out")).replace("GLUE", str(glue)) + extra)
    return path


def run_interleaved(engine, rows, rng: random.Random, started: bool = True, max_rows: int = 5) -> list:
    """A serving engine's answer to each row, submitted as requests of 1-``max_rows`` rows in a random
    order, from two threads, with pauses.

    started=False: every request is queued before the engine starts (calls then mix requests)."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    requests, start = [], 0
    while start < len(order):
        size = rng.randint(1, max_rows)
        requests.append(order[start:start + size])
        start += size
    futures: dict[int, object] = {}
    pauses = [rng.random() < 0.3 for _ in requests]

    def submit(which: list[int]) -> None:
        for index in which:
            futures[index] = engine.submit([rows[i] for i in requests[index]])
            if pauses[index]:
                time.sleep(0.002)

    threads = [threading.Thread(target=submit, args=(list(range(k, len(requests), 2)),)) for k in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if not started:
        engine.start()
    answers = [None] * len(rows)
    for index, rows_of in enumerate(requests):
        for position, output in zip(rows_of, futures[index].result(timeout=60)):
            answers[position] = output
    return answers
