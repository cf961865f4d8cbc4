"""`minituner quiz check`: the checks recompute the quiz's answers from minituner itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minituner.quiz import Tolerant, default_quiz_path, default_results_path, load_quiz
from minituner.quiz import check as quizcheck
from minituner.quiz import check_memory as quizcheck_memory
from minituner.quiz.locations import RESULTS_RELPATH
from minituner.quiz.results import load_results, read_results
from minituner.quiz.verify import compare_expected, compare_options, run_checks, run_one

ROOT = Path(__file__).resolve().parents[2]
RESULTS_QUESTIONS = {"q-28-11", "q-28-13"}


@pytest.fixture(scope="module")
def quiz():
    return load_quiz(default_quiz_path(ROOT))


def _results(**changes) -> dict:
    data = {
        "command": "minituner experiment --seed 0",
        "seed": 0,
        "lora_r8": {"control_ppl_change": 0.021, "irregular_accuracy_tuned": 0.93},
        # Shaped like the committed results: full fine-tuning forgot a little less than LoRA.
        "full_ft": {"control_ppl_change": 0.015},
        "sweep": {
            "ranks": [2, 4, 8, 16, 32],
            "irregular_accuracy": [0.70, 0.85, 0.93, 0.94, 0.94],
            "control_ppl": [10.1, 10.2, 10.3, 10.3, 10.4],
            "elbow_rank": 8,
        },
    }
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        target = data
        for key in parents:
            target = target[key]
        target[leaf] = value
    return data


def _write_results(root: Path, data: dict) -> Path:
    """Write ``data`` where checkout ``root`` keeps its results file; returns that path."""
    path = root / RESULTS_RELPATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- option tables


def test_option_tables_match_the_yaml(quiz):
    """The checks' coefficient tables follow the YAML's option order."""
    q01 = quiz.question("q-28-01").options
    assert [o.en for o in q01] == [f"{c} r" for c in quizcheck.Q01_COEFFICIENTS]
    q07 = zip(quiz.question("q-28-07").options, quizcheck_memory.Q07_BITS, strict=True)
    for option, (plain, double) in q07:
        assert f"{plain:g}" in option.en and f"{double:g}" in option.en
    q08 = zip(
        quiz.question("q-28-08").options,
        quizcheck_memory.Q08_BYTES_PER_PARAM_AND_7B_GB,
        strict=True,
    )
    for option, (per_param, gigabytes) in q08:
        assert option.en.startswith(f"{per_param} bytes") and f"{gigabytes} GB" in option.en
    q09 = zip(quiz.question("q-28-09").options, quizcheck_memory.Q09_GB_16BIT_AND_NF4, strict=True)
    for option, (sixteen, nf4) in q09:
        assert option.en.startswith(f"{sixteen} GB") and f"{nf4} GB" in option.en


def test_every_check_in_the_yaml_is_registered(quiz):
    names = {q.check for q in quiz.questions if q.check}
    assert names <= set(quizcheck.CHECKS)
    assert set(quizcheck.CHECKS) <= names, "a registered check no question uses"


# ----------------------------------------------------------------------------- comparison


def test_compare_options():
    assert compare_options(frozenset({1, 3}), {1, 3}) == []
    assert compare_options(frozenset({1, 3}), {1}) == ["true options [1] != answer [1, 3]"]
    assert compare_options(frozenset({1}), [1])  # a list is not a set of true options


def test_compare_expected_tolerance_and_types():
    expected = {"x": Tolerant(0.0208, 1e-4), "flag": True, "xs": Tolerant([1.0, 2.0], 0.1)}
    assert compare_expected(expected, {"x": 0.020833, "flag": True, "xs": [1.05, 1.95]}) == []
    problems = compare_expected(expected, {"x": 0.0212, "flag": 1, "xs": [1.0]})
    assert len(problems) == 3
    assert compare_expected({"x": 1}, {}) == ["x: not computed by the check"]
    assert compare_expected({"x": Tolerant(1.0, 0.5)}, {"x": float("nan")})


def test_a_raising_check_is_an_error_not_a_pass(quiz):
    def broken(root):
        raise ModuleNotFoundError("No module named 'minituner.nope'")

    outcome = run_one(quiz.question("q-28-01"), broken, default_results_path())
    assert outcome.status == "error" and not outcome.passed
    assert "minituner.nope" in outcome.message
    wrong = run_one(quiz.question("q-28-01"), lambda results: {3}, default_results_path())
    assert wrong.status == "mismatch" and not wrong.passed


# ----------------------------------------------------------------------------- results file


def test_results_missing_fails_the_results_checks(quiz, tmp_path):
    outcomes = run_checks(quiz, tmp_path / RESULTS_RELPATH, sorted(RESULTS_QUESTIONS))
    assert [o.status for o in outcomes] == ["error", "error"]
    assert all(str(tmp_path / RESULTS_RELPATH) in o.message for o in outcomes)


def test_results_checks_read_the_file(quiz, tmp_path):
    path = _write_results(tmp_path, _results())
    outcomes = run_checks(quiz, path, sorted(RESULTS_QUESTIONS))
    assert all(o.passed for o in outcomes), [o.to_dict() for o in outcomes]
    changed = _write_results(tmp_path, _results(sweep__elbow_rank=32))
    assert [o.status for o in run_checks(quiz, changed, ["q-28-13"])] == ["mismatch"]


def test_results_checks_default_to_the_packaged_file(quiz):
    """Without a path the checks read the results file shipped in the package."""
    assert default_results_path().name == "phase-28.json"
    assert load_results() == load_results(ROOT)
    outcomes = run_checks(quiz, None, sorted(RESULTS_QUESTIONS))
    assert [o.status for o in outcomes] == ["ok", "ok"], [o.to_dict() for o in outcomes]


@pytest.mark.parametrize(
    ("changes", "check", "true_options"),
    [
        ({"lora_r8__control_ppl_change": 0.08}, "forgetting_from_results", {3}),
        ({"full_ft__control_ppl_change": 0.01}, "forgetting_from_results", {2}),
        ({"full_ft__control_ppl_change": 0.12}, "forgetting_from_results", {1}),
        ({"lora_r8__control_ppl_change": 0.0, "full_ft__control_ppl_change": 0.0},
         "forgetting_from_results", {2, 4}),
        ({"sweep__elbow_rank": 32}, "rank_sweep_from_results", {2}),
        ({"sweep__irregular_accuracy": [0.9, 0.8, 0.7, 0.6, 0.5], "sweep__elbow_rank": 2},
         "rank_sweep_from_results", {1, 3}),
    ],
)
def test_results_checks_follow_the_numbers(tmp_path, changes, check, true_options):
    path = _write_results(tmp_path, _results(**changes))
    assert quizcheck.CHECKS[check](path) == true_options


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seed": "0"}, "'seed' must be int"),
        ({"sweep__ranks": [2, 4, 8]}, "'sweep.ranks' must be"),
        ({"sweep__control_ppl": [1.0]}, "'sweep.control_ppl' must hold 5 numbers"),
        ({"sweep__elbow_rank": 6}, "'sweep.elbow_rank' 6 is not one of"),
        ({"lora_r8__irregular_accuracy_tuned": 93}, "must be a fraction"),
    ],
)
def test_results_file_is_validated(tmp_path, changes, message):
    _write_results(tmp_path, _results(**changes))
    with pytest.raises(ValueError, match=message):
        load_results(tmp_path)


def test_results_file_missing_key(tmp_path):
    data = _results()
    del data["full_ft"]["control_ppl_change"]
    path = _write_results(tmp_path, data)
    with pytest.raises(ValueError, match="missing key 'full_ft.control_ppl_change'") as error:
        read_results(path)
    assert str(error.value).startswith(f"{path}: ")


# ----------------------------------------------------------------------------- the real checks


LIBRARY_QUESTIONS = ["q-28-01", "q-28-02", "q-28-03", "q-28-04", "q-28-12"]
QUANTIZATION_QUESTIONS = ["q-28-05", "q-28-06", "q-28-07", "q-28-08", "q-28-09", "q-28-10"]


@pytest.mark.parametrize("question_id", LIBRARY_QUESTIONS + QUANTIZATION_QUESTIONS)
def test_check_agrees_with_the_quiz(quiz, question_id):
    (outcome,) = run_checks(quiz, None, [question_id])
    assert outcome.passed, outcome.to_dict()


def _cli(*args, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
    return subprocess.run(
        [sys.executable, "-m", "minituner", "quiz", "check", *args], capture_output=True,
        text=True, encoding="utf-8", env=env, cwd=cwd, timeout=300,
    )


def test_cli_check_reports_missing_results_as_failed(tmp_path):
    result = _cli("--root", str(tmp_path), "--quiz", str(default_quiz_path(ROOT)),
                  "--ids", "q-28-01,q-28-11", "--json")
    assert result.returncode == 1
    outcomes = {o["id"]: o for o in json.loads(result.stdout)}
    assert outcomes["q-28-01"]["status"] == "ok"
    assert outcomes["q-28-11"]["status"] == "error"
    table = _cli("--root", str(tmp_path), "--quiz", str(default_quiz_path(ROOT)),
                 "--ids", "q-28-11")
    assert table.returncode == 1 and "FAILED" in table.stdout


def test_cli_check_reads_an_explicit_results_file(tmp_path):
    path = _write_results(tmp_path / "elsewhere", _results(sweep__elbow_rank=32))
    result = _cli("--results", str(path), "--ids", "q-28-11,q-28-13", "--json", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    outcomes = {o["id"]: o for o in json.loads(result.stdout)}
    assert outcomes["q-28-11"]["status"] == "ok"
    assert outcomes["q-28-13"]["status"] == "mismatch"


@pytest.mark.slow
def test_cli_check_passes_on_the_checkout():
    """Every check of the committed quiz passes (needs docs/results/phase-28.json)."""
    result = _cli()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout
