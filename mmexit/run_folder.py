"""The output folder of a run: checked before the first write, written through a staging folder,
published together at the end, with a manifest naming the run that wrote each file.

A run writes everything into ``<output_dir>/.staging-<run_id>/``; ``publish`` moves the files into
``output_dir`` when the run has finished, removes the files of earlier runs that no longer belong
(a new model makes every earlier result stale; a run that does not train keeps the model it
evaluated), and writes ``run_manifest.json`` last. A run killed at any point therefore leaves the
folder as the previous run left it (plus its checkpoints); its staging folder is removed at the
next start, as are temporary files of interrupted writes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

from mmexit.errors import RecipeError

MANIFEST = "run_manifest.json"
#: entries that outlive a run: checkpoints (resume), TensorBoard logs, the manifest itself
KEPT = ("checkpoints", "runs", MANIFEST)
#: what a run that does not train keeps of the run that trained: the model and its training log
MODEL_FILES = ("model", "train_log.jsonl")


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def clean_stale(output_dir: Path) -> None:
    """Remove staging folders and temporary files of interrupted runs and writes (hidden entries)."""
    for folder in (output_dir, output_dir / "model"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith("."):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def prepare(output_dir: Path, run_id: str) -> Path:
    """Create ``output_dir`` and the run's staging folder, proving they are writable; the staging path.

    Raises one RecipeError line when the folder cannot be written (an existing file, read-only, ...).
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise RecipeError(f"run.output_dir: {output_dir} exists and is not a folder")
    staging = output_dir / f".staging-{run_id}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        clean_stale(output_dir)
        staging.mkdir()
        probe = staging / ".write-test"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as error:
        raise RecipeError(f"run.output_dir: cannot write into {output_dir}: {error.strerror or error}") from None
    return staging


def check_free_space(output_dir: Path, needed_bytes: int, what: str) -> None:
    """One line when the disk holding ``output_dir`` has less free space than ``needed_bytes``."""
    free = shutil.disk_usage(output_dir).free
    if free < needed_bytes:
        raise RecipeError(f"run.output_dir: {free / 2**20:.0f} MiB free on the disk of {output_dir}, "
                          f"{what} needs about {needed_bytes / 2**20:.0f} MiB")


def publish(staging: Path, output_dir: Path, run_id: str, trained: bool) -> None:
    """Move the run's files into ``output_dir``, drop stale ones, write the manifest last."""
    previous = json.loads((output_dir / MANIFEST).read_text()) if (output_dir / MANIFEST).is_file() else {}
    old_files = previous.get("files", {})
    written = {path.name for path in staging.iterdir() if not path.name.startswith(".")}
    keep = set(KEPT) | written | (set() if trained else set(MODEL_FILES))
    for path in output_dir.iterdir():
        if path.name.startswith(".") or path.name in keep:
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for name in sorted(written):
        target = output_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    files = {name: run_id for name in written}
    if not trained:
        files.update({name: old_files.get(name, "earlier run") for name in MODEL_FILES if (output_dir / name).exists()})
    manifest = {"run_id": run_id, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": dict(sorted(files.items()))}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    os.replace(staging / MANIFEST, output_dir / MANIFEST)
    shutil.rmtree(staging, ignore_errors=True)
