"""The entry point: ``mmexit run | predict | serve | bench``.

``mmexit run RECIPE [key=value ...]`` (also ``mmexit RECIPE.yaml ...``, ``accelerate launch
tools/run.py RECIPE ...``): recipe -> validated config -> accelerate -> the task's stages ->
results. ``mmexit predict RUN_DIR ...``: a trained run on new inputs (``mmexit.serve.predict_cli``).
``mmexit serve RUN_DIR``: the HTTP server. A user error (bad recipe, missing file, malformed row) prints one line
and exits with status 2, and nothing in an existing output folder is overwritten: all inputs are
checked before the first write, and writes go through temporary files and renames.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

from mmexit import run_folder
from mmexit.bench.cli import bench_main
from mmexit.errors import MMExitError, RecipeError
from mmexit.models.precision import check_dtype
from mmexit.recipe.loading import load_recipe, save_recipe
from mmexit.recipe.tasks import task_for, validate_recipe
from mmexit.run_folder import new_run_id
from mmexit.serve.predict_cli import predict_main
from mmexit.serve.serve_cli import serve_main
from mmexit.stages import run_stages
from mmexit.tasks.base import Run
from mmexit.tasks.cascade_evaluation import cascade_main
from mmexit.training.checkpoints import Checkpointing, clean_incomplete, complete_checkpoints
from mmexit.training.trainer import request_preemption

RESULT_FILES = ("results.json", "rows.json", "model/mmexit_model.json", "model/captioner.json",
                "model/model.safetensors", "calibration.json", "run_manifest.json")


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse to write into a folder that already holds a run's outputs, unless asked to."""
    existing = [name for name in RESULT_FILES if (output_dir / name).exists()]
    if existing and not overwrite:
        raise RecipeError(
            f"run.output_dir: {output_dir} already holds results ({existing[0]}); "
            "choose another folder or set run.overwrite=true"
        )


def make_accelerator(recipe: dict, output_dir: Path):
    """An Accelerator with the recipe's precision, accumulation and tracker."""
    from accelerate import Accelerator

    train = recipe.get("train", {})
    log_with = recipe["run"]["log_with"]
    if log_with == "auto":
        import importlib.util

        log_with = "tensorboard" if importlib.util.find_spec("tensorboard") else None
    elif log_with == "none":
        log_with = None
    from datetime import timedelta

    import torch
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import InitProcessGroupKwargs

    if train.get("mixed_precision") == "bf16" and not torch.cuda.is_available() and not cpu_has_bf16():
        logging.warning("train.mixed_precision: bf16 on a CPU without AVX512-BF16 or AMX is emulated and "
                        "slower than float32; set train.mixed_precision=no")

    if PartialState().num_processes == 1:
        # one process may run several recipes (tests, notebooks); accelerate keeps the first one's
        # precision for the process and refuses another, so start each recipe from a clean state
        AcceleratorState._reset_state()
    try:
        return Accelerator(
            # the main process alone times and decodes while the others wait at a barrier: allow hours
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=6))],
            cpu=not torch.cuda.is_available(),  # also makes torchrun/mpirun CPU launches real DDP (gloo)
            mixed_precision=train.get("mixed_precision", "no"),
            gradient_accumulation_steps=train.get("grad_accum", 1),
            log_with=log_with,
            project_dir=str(output_dir),
        )
    except (ValueError, RuntimeError) as error:
        raise RecipeError(f"train.mixed_precision: {str(error).splitlines()[0]}") from None


def cpu_has_bf16() -> bool:
    """True when /proc/cpuinfo lists native bf16 arithmetic (avx512_bf16 or amx_bf16); True where
    it cannot be read (not Linux: no claim either way)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def set_cpu_threads(requested: Optional[int], accelerator) -> None:
    """On CPU, share the cores between processes: ``accelerate launch`` sets OMP_NUM_THREADS=1,
    which would leave a single process on one core. ``run.num_threads`` overrides."""
    import torch

    if requested:
        torch.set_num_threads(requested)
    elif accelerator.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // accelerator.num_processes))


def run_recipe(path: str, overrides: list[str]) -> list[dict]:
    """Load, validate and run a recipe; returns the result rows.

    Everything that can fail on bad input (recipe, data, rules, model) is checked before the
    first write into the output folder.
    """

    return run_validated(validate_recipe(load_recipe(path, overrides)))


def run_validated(recipe: dict) -> list[dict]:
    """Run a validated recipe (see ``run_recipe``); returns the result rows."""
    from accelerate.utils import set_seed

    output_dir = Path(recipe["run"]["output_dir"])
    if output_dir.exists() and not output_dir.is_dir():
        raise RecipeError(f"run.output_dir: {output_dir} exists and is not a folder")
    check_output_dir(output_dir, recipe["run"]["overwrite"])
    set_seed(recipe["run"]["seed"])
    accelerator = make_accelerator(recipe, output_dir)
    set_cpu_threads(recipe["run"]["num_threads"], accelerator)
    if "evaluate" in recipe:  # float16 on CPU, int8 on a GPU: refused before anything is written

        check_dtype(recipe["evaluate"].get("dtype", "float32"), accelerator.device)
    task = task_for(recipe["task"])
    run = Run(recipe, task, output_dir, accelerator)
    run.data = task.load_data(recipe)
    task.check_rules(recipe, run.data)
    model, run.processor = task.build_model(run)
    run.model = model.to(accelerator.device)
    trains = "train" in recipe["run"]["stages"]
    run.checkpointing = checkpointing_for(recipe, output_dir) if trains else None
    run_id = broadcast_run_id(accelerator)
    if accelerator.is_main_process:  # every input is checked: now the folder (writable, room for the model)
        run.write_dir = run_folder.prepare(output_dir, run_id)
        parameters = sum(p.numel() * p.element_size() for p in run.model.parameters())
        copies = 1 + (4 * run.checkpointing.keep if run.checkpointing and run.checkpointing.every else 0)
        if trains:
            run_folder.check_free_space(output_dir, parameters * copies, "the model" + (
                " and its checkpoints" if copies > 1 else ""))
        save_recipe(recipe, run.write_dir / "recipe.yaml")
    else:
        run.write_dir = output_dir / f".staging-{run_id}"
    if accelerator.trackers == [] and recipe["run"]["log_with"] != "none":
        try:
            accelerator.init_trackers(recipe["run"]["name"])
        except Exception:  # a tracker that fails must not stop the run
            pass
    try:
        with preemption_signal():
            rows = run_stages(run)
    except BaseException:
        if accelerator.is_main_process:  # nothing of a failed run is published; its staging goes
            import shutil

            shutil.rmtree(run.write_dir, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run_folder.publish(run.write_dir, output_dir, run_id, trained=trains)
    accelerator.end_training()
    return rows


def broadcast_run_id(accelerator) -> str:
    """One run id for every process (the main process draws it)."""
    from accelerate.utils import broadcast_object_list

    holder = [new_run_id() if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(holder)
    return holder[0]


def checkpointing_for(recipe: dict, output_dir: Path):
    """The run's Checkpointing (None when it neither checkpoints nor resumes)."""

    run_cfg = recipe["run"]
    resume = run_cfg["resume"]
    folder = output_dir / "checkpoints"
    if not run_cfg["checkpoint_every"] and resume is False:
        return None
    clean_incomplete(folder)
    found = complete_checkpoints(folder)
    if resume is True and not found:
        raise RecipeError(f"run.resume: no complete checkpoint in {folder} (use run.resume=auto to start fresh)")
    start = found[-1] if found and resume in (True, "auto") else None
    if start is None and found:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)  # a fresh run: earlier checkpoints are not its own
    return Checkpointing(folder, run_cfg["checkpoint_every"], run_cfg["keep_checkpoints"], start)


@contextlib.contextmanager
def preemption_signal():
    """SIGTERM during the run asks training to checkpoint and stop (a cluster's preemption)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, request_preemption)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def quiet_libraries() -> None:
    """Keep third-party chatter (hub warnings, tokenizer forks) out of the user's terminal."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*TensorFloat32.*")
    try:
        import huggingface_hub
        import transformers

        transformers.logging.set_verbosity_error()
        huggingface_hub.utils.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    logging.basicConfig(level=logging.WARNING, format="mmexit: %(levelname)s: %(message)s")


COMMANDS = ("run", "predict", "serve")


def close_progress_bars() -> None:
    """End any progress bar's line, so an error message starts on a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def run_main(argv: list[str]) -> int:
    """``mmexit run RECIPE [key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog="mmexit run", description="Train, calibrate, evaluate and report an early-exit model from a YAML recipe.")
    parser.add_argument("recipe", help="path to a YAML recipe (see recipes/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=1 run.output_dir=out")
    args = parser.parse_args(argv)
    quiet_libraries()
    try:
        rows = run_recipe(args.recipe, args.overrides)
    except MMExitError as error:
        close_progress_bars()
        print(f"mmexit: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        close_progress_bars()
        print("mmexit: interrupted", file=sys.stderr)
        return 130
    except OSError as error:
        close_progress_bars()  # a full disk, a folder gone read-only: the output folder is left as it was
        where = f"{error.filename}: " if error.filename else ""
        print(f"mmexit: error: cannot write the run's files: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    if rows:
        output_dir = Path(load_recipe(args.recipe, args.overrides)["run"]["output_dir"])
        table = output_dir / "results.md"
        if table.exists():
            print(table.read_text())
            print(f"mmexit: results in {output_dir}/ (results.json, results.md, speed_accuracy.png)")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``mmexit {run,predict,serve} ...``; ``mmexit RECIPE.yaml ...`` is ``mmexit run``. Exit 0, or 2 on a user error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "predict":
        quiet_libraries()
        return predict_main(argv[1:])
    if argv and argv[0] == "bench":
        quiet_libraries()
        return bench_main(argv[1:])
    if argv and argv[0] == "serve":
        quiet_libraries()
        return serve_main(argv[1:])
    if argv and argv[0] == "cascade":
        quiet_libraries()
        return cascade_main(argv[1:])
    if argv and argv[0] == "run":
        return run_main(argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: mmexit {run,predict,serve,bench} ...\n"
              "  mmexit run RECIPE.yaml [key=value ...]   train, calibrate, evaluate, report (also: mmexit RECIPE.yaml)\n"
              "  mmexit predict RUN_DIR --text TEXT | --input FILE   a trained run on new inputs, JSON lines out\n"
              "  mmexit bench {text,caption,speculative,engine,load,precision} ...   speed benchmarks (--help)\n"
              "  mmexit serve RUN_DIR [--host 127.0.0.1] [--port 8000]   serve a trained run over HTTP\n"
              "  mmexit cascade MEMBER_DIR... --recipe R --output OUT   evaluate a Multi-Model cascade")
        return 0 if argv else 2
    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
