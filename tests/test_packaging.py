"""A built wheel carries the course data, and an installed copy checks its quiz from anywhere.

The wheel is built from a copy of the checkout (so the build leaves nothing behind here) with
this interpreter's setuptools and no network, then installed with ``pip install --target`` into
a folder put first on PYTHONPATH; ``minituner quiz check`` then runs from an empty directory,
far from any checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from minituner.quiz import load_quiz

ROOT = Path(__file__).resolve().parents[1]
QUIZ = "data/quizzes/phase-28-lora-qlora.yaml"
RESULTS = "docs/results/phase-28.json"
PACKAGED = {
    "minituner/quiz/data/phase-28-lora-qlora.yaml": QUIZ,
    "minituner/quiz/data/phase-28.json": RESULTS,
}
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "src", "data/quizzes", "docs/results")


def _pip(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", *args, "--no-deps", "--no-index", "--quiet",
         "--disable-pip-version-check"],
        capture_output=True, text=True, cwd=cwd, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build the wheel once from a copy of the checkout's build inputs (symlinks kept)."""
    tree = tmp_path_factory.mktemp("tree")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in BUILD_INPUTS:
        source, target = ROOT / name, tree / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(source, target)
    out = tmp_path_factory.mktemp("wheelhouse")
    _pip("wheel", "--no-build-isolation", "-w", str(out), ".", cwd=tree)
    (built,) = out.glob("minituner-*.whl")
    return built


def test_wheel_holds_the_course_data(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for packaged, documented in PACKAGED.items():
            assert packaged in names, f"{packaged} missing from {wheel.name}"
            assert archive.read(packaged) == (ROOT / documented).read_bytes()
        probes = sorted((ROOT / "src/minituner/course/probes").glob("*.jsonl"))
        assert len(probes) >= 5
        for probe in probes:
            name = f"minituner/course/probes/{probe.name}"
            assert archive.read(name) == probe.read_bytes()
        assert "minituner/py.typed" in names
        assert not any(name.startswith(("tests/", "data/", "docs/")) for name in names)


def test_installed_copy_checks_the_quiz_from_an_empty_directory(wheel, tmp_path):
    site = tmp_path / "site"
    _pip("install", "--target", str(site), str(wheel), cwd=tmp_path)
    for packaged in PACKAGED:
        assert (site / packaged).is_file() and not (site / packaged).is_symlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, encoding="utf-8",
            cwd=empty, env=env, timeout=300,
        )

    where = run("-c", "import minituner.quiz.locations as m; print(m.__file__, m.checkout_root())")
    assert where.stdout.split() == [str(site / "minituner/quiz/locations.py"), "None"]
    result = run("-m", "minituner", "quiz", "check")
    assert result.returncode == 0, result.stdout + result.stderr
    checked = sum(question.check is not None for question in load_quiz(ROOT / QUIZ).questions)
    assert f"{checked}/{checked} checks passed" in result.stdout
    assert "FAILED" not in result.stdout
    assert list(empty.iterdir()) == []
