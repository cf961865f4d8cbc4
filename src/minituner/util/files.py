"""Atomic file writes, hashing and run manifests shared by every command."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` through ``write(tmp_path)`` then rename, so readers never see half a file.

    The temp file is fsynced before the rename and the folder after it, so a power loss cannot
    publish an empty or partial file under ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; use the usual mode
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as exc:  # RuntimeError: torch's and safetensors' writers
        tmp.unlink(missing_ok=True)
        raise _write_error(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _write_error(path: Path, exc: Exception) -> OSError:
    """A failed write as one OSError naming the file ("disk full" rather than a bare errno)."""
    errno_ = getattr(exc, "errno", None)
    if errno_ == errno.ENOSPC:
        reason = "no space left on device"
    else:
        reason = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [""])[0]
    error = OSError(f"{path}: cannot write ({reason or type(exc).__name__})")
    error.errno = errno_
    return error


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Build a directory in a staging folder next to ``path`` (yielded); on success it replaces
    ``path``, on error it is removed and ``path`` is untouched.

    The replacement is a swap that a SIGKILL cannot break: the new folder is complete and
    fsynced, the old one is renamed aside (``.NAME.old-*``), the new one renamed in, then the old
    one deleted. A kill between the renames leaves the old folder aside; the next
    :func:`recover_directory` (every atomic_directory starts with it) puts it back, or deletes it
    when the new one made it in.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-", dir=out.parent))
    try:
        os.chmod(staging, 0o777 & ~_current_umask())  # mkdtemp makes 0700; use the usual mode
        yield staging
        fsync_tree(staging)
        replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_directory(new: str | Path, path: str | Path) -> None:
    """Put the complete folder ``new`` at ``path`` (same parent), old or new surviving a kill."""
    new, out = Path(new), Path(path)
    aside = None
    if out.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, aside)  # rename onto the empty placeholder folder
    os.replace(new, out)
    _fsync_dir(out.parent)
    if aside is not None:
        shutil.rmtree(aside)


def remove_directory(path: str | Path) -> None:
    """Delete a folder by renaming it aside first, so a kill never leaves it half deleted."""
    out = Path(path)
    if not out.exists():
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.gone-", dir=out.parent))
    os.replace(out, aside)
    _fsync_dir(out.parent)
    shutil.rmtree(aside)


def recover_directory(path: str | Path) -> str | None:
    """Finish or undo a replacement of ``path`` that a kill interrupted; says which, or None.

    An old folder left aside goes back when ``path`` is missing (undo) and is deleted when the
    new one is in place (finish); unfinished staging folders and half-deleted folders are removed.
    """
    out = Path(path)
    if not out.parent.is_dir():
        return None
    done = None
    leftovers = sorted(out.parent.glob(f".{glob_escape(out.name)}.*-*"))
    for old in [p for p in leftovers if p.name.startswith(f".{out.name}.old-")]:
        if not out.exists() and any(old.iterdir()):
            os.replace(old, out)
            done = "undone"
        else:
            shutil.rmtree(old, ignore_errors=True)
            done = done or "finished"
    for other in leftovers:
        if other.name.startswith((f".{out.name}.new-", f".{out.name}.gone-")) and other.is_dir():
            shutil.rmtree(other, ignore_errors=True)
    if done:
        _fsync_dir(out.parent)
    return done


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def fsync_tree(path: str | Path) -> None:
    """fsync every file and folder under ``path`` (before a rename publishes it)."""
    root = Path(path)
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_file(path: Path) -> None:
    """Flush a written file's data to the disk (before a rename publishes it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder
    finally:
        os.close(fd)


def paths_overlap(a: str | Path, b: str | Path) -> str | None:
    """'is', 'is inside' or 'contains' when folder/file ``a`` overlaps ``b``; None when apart."""
    a, b = Path(a).resolve(), Path(b).resolve()
    if a == b:
        return "is"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


def check_out_apart(out: str | Path, inputs: dict) -> None:
    """Refuse an output folder equal to, inside or containing an input ({flag: path}), by name."""
    for flag, source in inputs.items():
        if source is None:
            continue
        relation = paths_overlap(out, source)
        if relation is not None:
            raise ValueError(f"--out {out} {relation} {flag} {source}; writing there could "
                             "destroy the input: choose another --out")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Atomically write raw bytes."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically write UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj) -> Path:
    """Atomically write pretty, key-sorted JSON (stable bytes for the same object)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_safetensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> Path:
    """Atomically save a dict of tensors with safetensors."""
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def load_safetensors(path: str | Path) -> dict:
    """Load a safetensors file, turning a missing or corrupt file into a one-line ValueError."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None


def read_json(path: str | Path, what: str = "JSON file") -> dict:
    """Read a JSON file, naming the file in any error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(obj) -> str:
    """Hex sha256 of an object's canonical JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def git_sha() -> str | None:
    """The checkout's commit, or None outside a git tree."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def package_versions() -> dict:
    """Versions of minituner and the libraries that decide its numbers."""
    versions = {"python": platform.python_version()}
    for name in ("minituner", "torch", "safetensors", "tokenizers", "transformers", "peft",
                 "bitsandbytes", "torchao"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware_info() -> dict:
    """CPU, thread count and GPU (if any) of this machine."""
    import torch

    info = {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run_manifest(seed: int, data_files: dict | None = None, **extra) -> dict:
    """Manifest for a run folder: seed, versions, git sha, hardware and data hashes."""
    hashes = {name: sha256_file(p) for name, p in (data_files or {}).items()}
    return {
        "seed": seed,
        "versions": package_versions(),
        "git_sha": git_sha(),
        "hardware": hardware_info(),
        "data_sha256": hashes,
        **extra,
    }


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (ru_maxrss), imports included."""
    import resource  # POSIX only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


MMAP_THRESHOLD_BYTES = 1 << 20  # the fixed mmap threshold `minituner finetune` sets on the CPU
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_PINNED: dict = {}  # what pin_mmap_threshold set in this process


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library, or None off Linux or where it cannot be loaded; looked up once
    (``find_library`` searches the system each time, and a CPU --fsdp run trims every step)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def _glibc_call(function: str, *args: int) -> bool:
    """Call a glibc-only function (``mallopt``, ``malloc_trim``); False where it is missing
    (another C library, another system) or reports failure (it returns 0)."""
    found = getattr(_libc(), function, None)  # None too where there is no C library
    return bool(found(*args)) if found is not None else False


def mmap_threshold_setting(environ=os.environ) -> int | None:
    """The fixed mmap threshold :func:`pin_mmap_threshold` sets: ``MINITUNER_MMAP_THRESHOLD``
    (bytes), 1 MiB when unset; None for "glibc" (glibc's own, growing threshold) or when
    ``MALLOC_MMAP_THRESHOLD_`` is set (glibc then already uses that fixed value)."""
    if "MALLOC_MMAP_THRESHOLD_" in environ:
        return None
    value = environ.get("MINITUNER_MMAP_THRESHOLD", "").strip()
    if value == "glibc":
        return None
    if not value:
        return MMAP_THRESHOLD_BYTES
    if not value.isdigit() or int(value) <= 0:
        raise ValueError(f"MINITUNER_MMAP_THRESHOLD must be a positive number of bytes or "
                         f"'glibc', got {value!r}")
    return int(value)


def pin_mmap_threshold(environ=os.environ) -> int | None:
    """Fix glibc's mmap threshold (``mallopt(M_MMAP_THRESHOLD)``, see
    :func:`mmap_threshold_setting`) so every block that large or larger is mapped and returned
    on its own; returns the bytes set, or None when left alone or unavailable. It lasts for the
    whole process (glibc cannot be given its growing threshold back), so ``minituner
    finetune`` calls it for a CPU run, which owns its process; a library call does not.

    glibc's default threshold starts at 128 KiB and rises to the largest block freed so far,
    up to 32 MiB: after a CPU training step frees its first large tensors, later activations
    of a few MiB come from the heap, and the heap's freed holes stay resident, so the peak
    grows from step to step. Fixed at 1 MiB, each large block costs a fresh mapping (page
    faults); ``benchmarks/memory_validation.py --plan`` measures both sides.
    """
    size = mmap_threshold_setting(environ)
    if size is None or not _glibc_call("mallopt", _M_MMAP_THRESHOLD, size):
        return None
    _PINNED["bytes"] = size
    return size


def mmap_threshold_in_effect(environ=os.environ) -> int | None:
    """The fixed mmap threshold this process runs with: the one :func:`pin_mmap_threshold`
    set, else a ``MALLOC_MMAP_THRESHOLD_`` glibc read at start; None for glibc's own."""
    if "bytes" in _PINNED:
        return _PINNED["bytes"]
    value = environ.get("MALLOC_MMAP_THRESHOLD_", "").strip()
    return int(value) if value.isdigit() else None


def release_freed_memory() -> bool:
    """Hand the heap memory freed so far back to the OS (glibc's ``malloc_trim(0)``), so what a
    finished step (loading a base, say) freed does not stay resident; False where unavailable."""
    return _glibc_call("malloc_trim", 0)
