"""Reports from run folders written by hand: the numbers, the files and the errors."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from quatnn import cli, report
from quatnn.report.table import summarize

# variant -> seed -> test accuracy per epoch; samples/s is 1000 * (epoch + seed) for real.
ACCURACY = {
    "real4": {0: [0.50, 0.80, 0.70], 1: [0.60, 0.90, 0.85]},
    "quaternion": {0: [0.40, 0.60, 0.75], 1: [0.45, 0.65, 0.80]},
}
PARAMS = {"real4": 4_000, "quaternion": 1_000}


def _write_run(
    folder: Path,
    variant: str,
    seed: int,
    accuracies: list[float],
    finished: bool = True,
    model: str = "conv2",
) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(
        f'model = "{model}"\nvariant = "{variant}"\ndataset = "cifar10"\nseed = {seed}\n'
    )
    rows = [
        {
            "epoch": e,
            "train_acc": a + 0.05,
            "test_acc": a,
            "train_loss": 1 / e,
            "test_loss": 1.5 / e,
            "epoch_seconds": 2.0 * e,
            "samples_per_second": 1000.0 * (e + seed),
        }
        for e, a in enumerate(accuracies, 1)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if finished:
        summary = {"params": PARAMS.get(variant, 2_000), "device": "cpu (2 threads)"}
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def comparison(tmp_path) -> Path:
    for variant, seeds in ACCURACY.items():
        for seed, accuracies in seeds.items():
            _write_run(tmp_path / f"{variant}-s{seed}", variant, seed, accuracies)
    return tmp_path


def test_table_numbers_come_from_the_metrics(comparison):
    rows = {row["variant"]: row for row in summarize(report.find_runs([comparison]))}
    assert list(rows) == ["real4", "quaternion"]  # variant order, not folder order
    for variant, seeds in ACCURACY.items():
        row = rows[variant]
        finals = [accs[-1] for accs in seeds.values()]
        bests = [max(accs) for accs in seeds.values()]
        assert row["final_acc"] == pytest.approx(statistics.mean(finals))
        assert row["final_acc_std"] == pytest.approx(statistics.stdev(finals))
        assert row["best_acc"] == pytest.approx(statistics.mean(bests))
        assert row["best_acc_std"] == pytest.approx(statistics.stdev(bests))
        assert row["seconds_per_epoch"] == pytest.approx(5.0)  # epochs 2 and 3: 4 s and 6 s
        # seed 0: mean(2000, 3000), seed 1: mean(3000, 4000)
        assert row["samples_per_second"] == pytest.approx(3000.0)
        assert (row["runs"], row["epochs"], row["params"]) == (2, 3, PARAMS[variant])
    assert rows["quaternion"]["ratio"] == pytest.approx(0.25)
    assert rows["real4"]["reference"] == "real4"


def test_report_files_and_table(comparison, capsys):
    assert cli.main(["report", str(comparison)]) == 0
    printed = capsys.readouterr().out
    for name in report.FILES:
        assert (comparison / name).stat().st_size > 0
    for name in ("accuracy.png", "loss.png", "throughput.png"):
        assert (comparison / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (comparison / "report.md").read_text()
    assert markdown.startswith("# conv2 on cifar10")
    # real4 final: 0.70, 0.85 -> 77.50 ± 10.61; best: 0.80, 0.90 -> 85.00 ± 7.07
    real4 = "| real4 | 2 | 3 | 4,000 | 1.000 | 77.50 ± 10.61 | 85.00 ± 7.07 | 5.00 | 3000 |"
    quaternion = (
        "| quaternion | 2 | 3 | 1,000 | 0.250 | 77.50 ± 3.54 | 77.50 ± 3.54 | 5.00 | 3000 |"
    )
    assert real4 in markdown and quaternion in markdown
    assert real4 in printed
    numbers = json.loads((comparison / "report.json").read_text())
    assert len(numbers["runs"]) == 4 and numbers["rows"][0]["final_acc"] == pytest.approx(0.775)


def test_individual_run_folders_unfinished_and_empty_runs(tmp_path):
    a = _write_run(tmp_path / "a", "real", 0, [0.5, 0.6], model="lenet_300_100")
    b = _write_run(tmp_path / "b", "quaternion", 0, [0.4], finished=False, model="lenet_300_100")
    c = _write_run(tmp_path / "c", "quaternion", 1, [], finished=False, model="lenet_300_100")
    result = report.write_report([a, b, c], out=tmp_path / "out")
    assert "| quaternion | 1 (1 unfinished) | 1 | ? | - |" in result.table
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert f"left out): {c}" in markdown


def test_several_models_are_labelled_and_compared_within_their_own_model(tmp_path):
    _write_run(tmp_path / "x" / "real4-s0", "real4", 0, [0.5])
    _write_run(tmp_path / "x" / "quaternion-s0", "quaternion", 0, [0.5])
    _write_run(tmp_path / "y" / "real4-s0", "real4", 0, [0.5], model="conv4")
    result = report.write_report([tmp_path / "x", tmp_path / "y"], out=tmp_path / "both")
    labels = [row.split(" | ")[0] for row in result.table.splitlines()[2:]]
    assert labels == [
        "| conv2 cifar10 real4",
        "| conv2 cifar10 quaternion",
        "| conv4 cifar10 real4",
    ]
    assert [row["ratio"] for row in result.rows] == [1.0, 0.25, 1.0]


def _damaged(tmp_path: Path) -> Path:
    run = _write_run(tmp_path / "r", "real", 0, [0.5])
    (run / "metrics.jsonl").write_text("{not json\n")
    return run


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p / "missing", "is not a folder"),
        (lambda p: p, "holds no quatnn runs"),
        (_damaged, "cannot read run folder"),
    ],
)
def test_report_errors_are_one_line(tmp_path, capsys, setup, message):
    assert cli.main(["report", str(setup(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_several_folders_need_an_output_folder(comparison):
    with pytest.raises(report.ReportError, match="--out"):
        report.write_report([comparison, comparison])


def test_report_never_imports_train():
    code = "import sys, quatnn.report; print('quatnn.train' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
