"""util.files: atomic folder replacement that survives SIGKILL, and inputs kept apart from --out."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minituner.util.files import (
    MMAP_THRESHOLD_BYTES,
    atomic_directory,
    atomic_write,
    check_out_apart,
    mmap_threshold_in_effect,
    mmap_threshold_setting,
    paths_overlap,
    recover_directory,
    remove_directory,
    replace_directory,
)

FILES, SIZE = 12, 1 << 16


def write_version(folder: Path, version: int) -> None:
    for i in range(FILES):
        (folder / f"part{i:02d}.bin").write_bytes(bytes([version % 256]) * SIZE)


def whole_version(folder: Path) -> int:
    """The version a folder holds, asserting every file is there and of that version."""
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"part{i:02d}.bin" for i in range(FILES)], names
    versions = {p.read_bytes() for p in folder.iterdir()}
    assert len(versions) == 1 and len(next(iter(versions))) == SIZE
    return next(iter(versions))[0]


def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path,
                                                                            monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", None)),
                                                     real_replace(a, b))[1])
    target = tmp_path / "sub" / "data.bin"
    atomic_write(target, lambda tmp: tmp.write_bytes(b"payload"))
    assert target.read_bytes() == b"payload"
    assert events == [("fsync", target.stat().st_ino), ("replace", None),
                      ("fsync", target.parent.stat().st_ino)]


def test_atomic_directory_swaps_in_the_new_folder_and_leaves_nothing_beside(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as staging:
        write_version(staging, 1)
    with atomic_directory(out) as staging:
        write_version(staging, 2)
    assert whole_version(out) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(RuntimeError), atomic_directory(out) as staging:
        write_version(staging, 3)
        raise RuntimeError("failed half way")
    assert whole_version(out) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_recover_undoes_a_swap_killed_between_the_renames(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_version(out, 1)
    aside = tmp_path / ".out.old-abc123"
    aside.mkdir()
    os.replace(out, aside)  # killed here: the old folder aside, the new one not yet in
    (tmp_path / ".out.new-xyz").mkdir()  # a staging folder left half built
    assert recover_directory(out) == "undone"
    assert whole_version(out) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_recover_finishes_a_swap_killed_before_the_old_folder_was_deleted(tmp_path):
    out, aside = tmp_path / "out", tmp_path / ".out.old-abc123"
    out.mkdir()
    aside.mkdir()
    write_version(out, 2)
    write_version(aside, 1)
    assert recover_directory(out) == "finished"
    assert whole_version(out) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert recover_directory(out) is None  # nothing to do the second time


def test_replace_and_remove_directory(tmp_path):
    new, out = tmp_path / "new", tmp_path / "out"
    new.mkdir()
    out.mkdir()
    write_version(new, 5)
    write_version(out, 4)
    replace_directory(new, out)
    assert whole_version(out) == 5 and not new.exists()
    remove_directory(out)
    assert list(tmp_path.iterdir()) == []
    remove_directory(out)  # a missing folder is fine


@pytest.mark.parametrize(("out", "source", "relation"), [
    ("a", "a", "is"), ("a/b", "a", "is inside"), ("a", "a/data.jsonl", "contains"),
    ("a", "b", None), ("ab", "a", None),
])
def test_paths_overlap(tmp_path, out, source, relation):
    assert paths_overlap(tmp_path / out, tmp_path / source) == relation


def test_check_out_apart_names_the_flag_and_both_paths(tmp_path):
    data = tmp_path / "runs" / "data.jsonl"
    with pytest.raises(ValueError, match=r"--out .*runs contains --train-data .*data\.jsonl"):
        check_out_apart(tmp_path / "runs", {"--base": None, "--train-data": data})
    with pytest.raises(ValueError, match=r"is inside --base"):
        check_out_apart(tmp_path / "base" / "tuned", {"--base": tmp_path / "base"})
    check_out_apart(tmp_path / "tuned", {"--base": tmp_path / "base", "--train-data": data})


KILL_SCRIPT = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_files import write_version
from minituner.util.files import atomic_directory
out = Path(sys.argv[1])
version = int(sys.argv[2])
print("ready", flush=True)
while True:
    version += 1
    with atomic_directory(out) as staging:
        write_version(staging, version)
"""


def test_sigkill_at_random_moments_of_replacement_leaves_the_old_or_the_new_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_version(out, 0)
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent))
    rng = random.Random(0)
    seen = set()
    for _ in range(8):
        before = whole_version(out)
        proc = subprocess.Popen([sys.executable, "-c", script, str(out), str(before)],
                                stdout=subprocess.PIPE, env={**os.environ})
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        recover_directory(out)  # what the next command does first
        after = whole_version(out)  # every file there, all of one version: old or new
        seen.add(after != before)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert True in seen  # the kills did land during replacements


def test_release_freed_memory_trims_the_heap_on_linux():
    import sys

    from minituner.util.files import release_freed_memory

    blocks = [bytearray(1 << 16) for _ in range(256)]  # 16 MiB in heap-sized pieces
    del blocks
    assert release_freed_memory() is sys.platform.startswith("linux")


def test_mmap_threshold_setting_reads_the_environment():
    assert mmap_threshold_setting({}) == MMAP_THRESHOLD_BYTES == 1 << 20
    assert mmap_threshold_setting({"MINITUNER_MMAP_THRESHOLD": "4194304"}) == 4194304
    assert mmap_threshold_setting({"MINITUNER_MMAP_THRESHOLD": "glibc"}) is None
    # glibc already fixed it from its own variable: left alone
    assert mmap_threshold_setting({"MALLOC_MMAP_THRESHOLD_": "131072"}) is None
    for bad in ("0", "-5", "1MiB"):
        with pytest.raises(ValueError, match="MINITUNER_MMAP_THRESHOLD must be a positive"):
            mmap_threshold_setting({"MINITUNER_MMAP_THRESHOLD": bad})


PIN = """
from minituner.util.files import mmap_threshold_in_effect, pin_mmap_threshold
print(mmap_threshold_in_effect({}), pin_mmap_threshold({"MINITUNER_MMAP_THRESHOLD": "glibc"}),
      pin_mmap_threshold({}), mmap_threshold_in_effect({}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_pin_mmap_threshold_sets_glibcs_threshold():
    # in a process of its own: the setting lasts for the whole process
    done = subprocess.run([sys.executable, "-c", PIN], capture_output=True, text=True,
                          timeout=60, env={k: v for k, v in os.environ.items()
                                           if k != "MALLOC_MMAP_THRESHOLD_"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "None", str(1 << 20), str(1 << 20)]
    # this process pinned nothing: glibc's own, or what its environment fixed
    assert mmap_threshold_in_effect({"MALLOC_MMAP_THRESHOLD_": "131072"}) == 131072
    assert mmap_threshold_in_effect({}) is None
