"""Reports from run folders written by hand: the numbers, the files and the errors."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from quatnn import cli, report
from quatnn.report.lottery import level_table
from quatnn.report.plots import plot_curves
from quatnn.report.table import IGNORED_KEYS, group_runs, summarize

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
    val_accuracies: list[float] | None = None,
    val_losses: list[float] | None = None,
    top5_accuracies: list[float] | None = None,
    **config: object,
) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(
        f'model = "{model}"\nvariant = "{variant}"\ndataset = "cifar10"\nseed = {seed}\n'
        + "".join(f"{key} = {json.dumps(value)}\n" for key, value in config.items())
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
    for e, (row, val) in enumerate(
        zip(rows, val_accuracies, strict=True) if val_accuracies else ()
    ):
        row |= {"val_loss": val_losses[e] if val_losses else 1.0, "val_acc": val}
    for row, top5 in zip(rows, top5_accuracies, strict=True) if top5_accuracies else ():
        row["test_top5"] = top5
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


def test_the_best_epoch_of_runs_with_a_validation_set_is_chosen_on_it(tmp_path):
    # seed 0: best validation at epoch 3 (test 0.70), seed 1: at epoch 1 (test 0.60)
    for seed, val in ((0, [0.5, 0.6, 0.9]), (1, [0.8, 0.8, 0.7])):
        _write_run(tmp_path / f"real4-s{seed}", "real4", seed, ACCURACY["real4"][seed],
                   val_accuracies=val, val_split=0.1)  # fmt: skip
    (row,) = summarize(report.find_runs([tmp_path]))
    assert row["best_acc"] == pytest.approx(statistics.mean([0.70, 0.60]))
    assert row["final_acc"] == pytest.approx(statistics.mean([0.70, 0.85]))
    assert row["best_val_acc"] == pytest.approx(statistics.mean([0.9, 0.8]))
    groups = group_runs(report.find_runs([tmp_path]))
    figure = plot_curves(groups, "acc", tmp_path / "acc.png", percent=True)
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    validation = lines["real4 validation"].get_ydata()  # the mean over seeds, per epoch
    assert validation == pytest.approx([65.0, 70.0, 80.0])
    assert lines["real4 test (n=2)"].get_ydata() == pytest.approx([55.0, 85.0, 77.5])
    _write_run(tmp_path / "quaternion-s0", "quaternion", 0, [0.5, 0.6])  # no validation set
    table = report.write_report([tmp_path]).table
    assert "| best test acc (%) | best val acc (%) |" in table
    assert "| 65.00 ± 7.07 | 85.00 ± 7.07 |" in table  # real4: test at the chosen epochs
    assert "| 60.00 | - |" in table  # quaternion: none held out
    assert "on the validation set where it holds one out" in (tmp_path / "report.md").read_text()


def test_runs_with_best_by_loss_are_reported_at_their_lowest_validation_loss(tmp_path):
    # lowest validation loss: seed 0 at epoch 1 (test 0.50), seed 1 at epoch 2 (test 0.90)
    for seed, losses in ((0, [0.2, 0.3, 0.4]), (1, [0.5, 0.1, 0.3])):
        _write_run(tmp_path / f"real4-s{seed}", "real4", seed, ACCURACY["real4"][seed],
                   val_accuracies=[0.5, 0.6, 0.9], val_losses=losses, val_split=0.1,
                   best_by="loss")  # fmt: skip
    (row,) = summarize(report.find_runs([tmp_path]))
    assert row["best_acc"] == pytest.approx(statistics.mean([0.50, 0.90]))
    assert row["best_val_acc"] == pytest.approx(statistics.mean([0.5, 0.6]))


def test_top5_columns_where_runs_measured_it(tmp_path):
    # best (top-1) epochs: 2 and 2; their top-5: 0.95 and 0.97; the last: 0.90 and 0.99
    for seed, top5 in ((0, [0.7, 0.95, 0.90]), (1, [0.8, 0.97, 0.99])):
        _write_run(tmp_path / f"real4-s{seed}", "real4", seed, ACCURACY["real4"][seed],
                   top5_accuracies=top5)  # fmt: skip
    _write_run(tmp_path / "quaternion-s0", "quaternion", 0, [0.5, 0.6])  # not measured
    rows = {row["variant"]: row for row in summarize(report.find_runs([tmp_path]))}
    assert rows["real4"]["final_top5"] == pytest.approx(statistics.mean([0.90, 0.99]))
    assert rows["real4"]["best_top5"] == pytest.approx(statistics.mean([0.95, 0.97]))
    assert rows["quaternion"]["final_top5"] is None
    written = report.write_report([tmp_path])
    assert "| final test top-5 (%) | best test top-5 (%) |" in written.table
    assert "| 94.50 ± 6.36 | 96.00 ± 1.41 |" in written.table
    assert "| 60.00 | - | - |" in written.table
    assert "Top-5:" in (tmp_path / "report.md").read_text()
    plain = _write_run(tmp_path / "plain" / "quaternion-s0", "quaternion", 0, [0.5, 0.6])
    assert "top-5" not in report.write_report([plain.parent]).table


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
    assert "Unfinished runs (quaternion) count with their latest epoch" in markdown
    assert "Unfinished" not in report.write_report([a], out=tmp_path / "done").files[0].read_text()


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


def _not_an_object(tmp_path: Path) -> Path:
    run = _write_run(tmp_path / "r", "real", 0, [0.5])
    (run / "metrics.jsonl").write_text("[1, 2]\n")
    return run


def _lacking(tmp_path: Path) -> Path:
    run = _write_run(tmp_path / "r", "real", 0, [0.5, 0.6])
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(f"{rows[0]}\n{json.dumps({'epoch': 2})}\n")
    return run


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p / "missing", "is not a folder"),
        (lambda p: p, "holds no quatnn runs"),
        (_damaged, "cannot read run folder"),
        (_lacking, "metrics.jsonl, line 2, lacks train_acc, test_acc, train_loss"),
        (_not_an_object, "metrics.jsonl, line 1: not a metrics row (a JSON object)"),
    ],
)
def test_report_errors_are_one_line(tmp_path, capsys, setup, message):
    assert cli.main(["report", str(setup(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_a_row_being_written_is_left_out(tmp_path):
    """A report read while a run appends to metrics.jsonl sees the rows written so far."""
    run = _write_run(tmp_path / "r", "real", 0, [0.5, 0.6, 0.7], finished=False)
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text[:-20])  # the last row is half written
    assert [row["test_acc"] for row in report.read_run(run).metrics] == [0.5, 0.6]
    (run / "metrics.jsonl").write_text(text[:-1])  # all of it, but for the newline
    assert [row["test_acc"] for row in report.read_run(run).metrics] == [0.5, 0.6, 0.7]


@pytest.mark.filterwarnings("error")  # matplotlib warns when its layout collapses
def test_plots_of_many_rows_keep_their_layout(tmp_path):
    for i in range(16):
        variant = ("real4", "quaternion")[i % 2]
        settings = {"lr": 0.001 * (1 + i // 2), "optimizer": "adam", "scheduler": "cosine"}
        _write_run(tmp_path / f"{variant}-{i}", variant, i, [0.5, 0.6], **settings)
    result = report.write_report([tmp_path], out=tmp_path / "out")
    assert len(result.rows) == 16 and all(path.is_file() for path in result.files)


def test_several_folders_need_an_output_folder(comparison):
    with pytest.raises(report.ReportError, match="--out"):
        report.write_report([comparison, comparison])


@pytest.mark.parametrize(
    ("imported", "never"),
    [("quatnn.report", "quatnn.train"), ("quatnn.train.runner", "quatnn.report")],
)
def test_report_and_train_never_import_each_other(imported, never):
    code = f"import sys, {imported}; print({never!r} in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_runs_that_differ_in_more_than_the_seed_get_rows_of_their_own(tmp_path):
    adam = {"epochs": 2, "optimizer": "adam"}
    _write_run(tmp_path / "a" / "quaternion-s0", "quaternion", 0, [0.5, 0.6], **adam)
    elsewhere = {"device": "cuda", "workers": 4, "data_dir": "/data", "compile": True}
    _write_run(tmp_path / "a" / "quaternion-s1", "quaternion", 1, [0.5, 0.8], **adam, **elsewhere)
    _write_run(tmp_path / "b" / "quaternion-s0", "quaternion", 0, [0.9] * 10, epochs=10)
    sgd = {"epochs": 2, "optimizer": "sgd"}
    _write_run(tmp_path / "c" / "quaternion-s0", "quaternion", 0, [0.7, 0.7], **sgd)
    result = report.write_report([tmp_path], out=tmp_path / "out")
    rows = {row["label"]: row for row in result.rows}
    assert list(rows) == [
        "quaternion (epochs=2, optimizer=adam)",
        "quaternion (epochs=10)",  # no optimizer in its config.toml
        "quaternion (epochs=2, optimizer=sgd)",
    ]
    pooled = rows["quaternion (epochs=2, optimizer=adam)"]  # device, workers, ... ignored
    assert pooled["runs"] == 2 and pooled["final_acc"] == pytest.approx(0.7)
    assert pooled["final_acc_std"] == pytest.approx(statistics.stdev([0.6, 0.8]))
    assert [row["runs"] for row in result.rows] == [2, 1, 1]
    assert "| quaternion (epochs=10) | 1 | 10 | 1,000 | - | 90.00 | 90.00 |" in result.table
    assert "| 70.00 ± 14.14 | 70.00 ± 14.14 |" in result.table


def test_encoding_tells_rows_apart_only_within_a_variant(tmp_path):
    # older runs wrote each variant's default encoding, newer ones keep auto
    _write_run(tmp_path / "old" / "real3-s0", "real3", 0, [0.5], encoding="identity")
    _write_run(tmp_path / "old" / "quaternion-s0", "quaternion", 0, [0.5], encoding="rgb_gray")
    labels = [row["label"] for row in summarize(report.find_runs([tmp_path / "old"]))]
    assert labels == ["real3", "quaternion"]
    _write_run(tmp_path / "new" / "quaternion-s1", "quaternion", 1, [0.5], encoding="auto")
    _write_run(tmp_path / "new" / "quaternion-s2", "quaternion", 2, [0.5], encoding="pure")
    rows = summarize(report.find_runs([tmp_path]))
    assert [row["label"] for row in rows] == [
        "real3 (encoding=identity)",
        "quaternion (encoding=rgb_gray)",  # auto on colour data: rgb_gray, as trained
        "quaternion (encoding=pure)",
    ]
    assert [row["runs"] for row in rows] == [1, 2, 1]
    # summary.json names the encoding a run trained on (a rule of another version)
    (tmp_path / "new" / "quaternion-s1" / "summary.json").write_text('{"encoding": "pure"}')
    rows = summarize(report.find_runs([tmp_path]))
    assert {row["label"]: row["runs"] for row in rows}["quaternion (encoding=pure)"] == 2


def test_ignored_keys_are_the_runtime_fields_and_lottery_bookkeeping():
    from quatnn.prune.lottery import LotteryConfig
    from quatnn.train.config import FIELDS, RUNTIME_FIELDS

    config_keys = {key for key in IGNORED_KEYS if key in FIELDS}
    assert config_keys == set(RUNTIME_FIELDS) - {"sync_bn"}
    lottery = LotteryConfig()
    assert set(IGNORED_KEYS) - config_keys == set(lottery.to_dict()) - set(lottery.identity())


def test_a_run_folder_reached_twice_counts_once(comparison):
    (comparison / "loop").symlink_to(comparison)  # found again below itself
    again = [comparison / "real4-s0", comparison / ".." / comparison.name]
    runs = report.find_runs([comparison, *again])
    names = ["quaternion-s0", "quaternion-s1", "real4-s0", "real4-s1"]
    assert [r.path for r in runs] == [comparison / name for name in names]
    rows = summarize(runs)
    assert [(row["runs"], row["repeated_seeds"]) for row in rows] == [(2, []), (2, [])]


def test_the_same_settings_and_seed_in_two_folders_are_kept_and_noted(comparison):
    shutil.copytree(comparison / "quaternion-s0", comparison / "copy" / "quaternion-s0")
    result = report.write_report([comparison])
    rows = {row["label"]: row for row in result.rows}
    assert (rows["quaternion"]["runs"], rows["quaternion"]["repeated_seeds"]) == (3, [0])
    assert rows["real4"]["repeated_seeds"] == []
    notes = [
        line for line in (comparison / "report.md").read_text().splitlines() if "seed 0" in line
    ]
    assert notes == [
        "- quaternion: seed 0 in several run folders with the same settings (copies or "
        "reruns); each counts as a run, so its spread is not over distinct seeds."
    ]
    rows_note = (comparison / "report.md").read_text().split("- Rows:")[1].splitlines()[0]
    assert "backend" in rows_note and "levels" not in rows_note  # no lottery bookkeeping here


def _write_lottery(folder: Path, seeds: tuple[int, ...], rate: float, levels: int) -> None:
    """A lottery folder as quatnn lottery writes it: levels 0 and 1, a reinit control at
    level 1; final accuracy 0.5 + 0.1 level (+ 0.05 reinit) + 0.01 seed."""
    folder.mkdir(parents=True)
    (folder / "lottery.toml").write_text(
        'model = "conv2"\ndataset = "cifar10"\nvariants = ["real4"]\nseeds = []\n\n'
        f'[lottery]\nrate = {rate}\nrewind = "0"\nlevels = {levels}\ncontrols = ["reinit"]\n'
    )
    for seed in seeds:
        for level, control in ((0, None), (1, None), (1, "reinit")):
            name = f"level-{level:02d}" + (f"-{control}" if control else "")
            acc = 0.5 + 0.1 * level + (0.05 if control else 0) + 0.01 * seed
            run = _write_run(folder / f"real4-s{seed}" / name, "real4", seed, [acc])
            left = round(PARAMS["real4"] * (1 - rate) ** level)
            params = {"total": PARAMS["real4"], "remaining": left}
            sparsity = {"level": level, "control": control, "reference": "real4", "params": params}
            (run / "sparsity.json").write_text(json.dumps(sparsity))


def test_lottery_levels_controls_and_recipes_are_never_pooled(tmp_path):
    _write_lottery(tmp_path / "a", (0, 1), rate=0.5, levels=1)
    _write_lottery(tmp_path / "b", (2,), rate=0.5, levels=3)  # levels: not a difference
    _write_lottery(tmp_path / "c", (0,), rate=0.2, levels=1)
    _write_run(tmp_path / "d" / "real4-s0", "real4", 0, [0.4])
    result = report.write_report(
        [tmp_path / "a", tmp_path / "b", tmp_path / "c", tmp_path / "d"], out=tmp_path / "out"
    )
    rows = {row["label"]: row for row in result.rows}
    assert list(rows) == [
        "real4 (level=0, control=ticket, rate=0.5)",
        "real4 (level=1, control=ticket, rate=0.5)",
        "real4 (level=1, control=reinit, rate=0.5)",
        "real4 (level=0, control=ticket, rate=0.2)",
        "real4 (level=1, control=ticket, rate=0.2)",
        "real4 (level=1, control=reinit, rate=0.2)",
        "real4",
    ]
    assert [row["runs"] for row in result.rows] == [3, 3, 3, 1, 1, 1, 1]
    reinit = rows["real4 (level=1, control=reinit, rate=0.5)"]
    assert reinit["final_acc"] == pytest.approx(0.65 + 0.01)  # seeds 0, 1, 2
    # a level's parameters are those left after pruning, against the unpruned real4
    assert [(row["params"], row["ratio"]) for row in result.rows][3:] == [
        (PARAMS["real4"], 1.0), (round(0.8 * PARAMS["real4"]), 0.8),
        (round(0.8 * PARAMS["real4"]), 0.8), (PARAMS["real4"], 1.0)
    ]  # fmt: skip
    note = "Ratio to real: parameters (lottery levels: the parameters left after pruning)"
    assert note in (tmp_path / "out" / "report.md").read_text()
    chain = summarize(report.find_runs([tmp_path / "a" / "real4-s0"]))
    assert [row["label"] for row in chain] == [
        "real4 (level=0, control=ticket)",
        "real4 (level=1, control=ticket)",
        "real4 (level=1, control=reinit)",
    ]


def test_run_folders_are_found_at_any_depth_in_name_order(tmp_path, capsys):
    late = _write_run(tmp_path / "x" / "deep" / "er" / "real4-s1", "real4", 1, [0.6])
    early = _write_run(tmp_path / "x" / "a" / "quaternion-s0", "quaternion", 0, [0.5])
    _write_run(early / "inner", "quaternion", 1, [0.9])  # inside a run folder: not searched
    first = _write_run(tmp_path / "y" / "real4-s0", "real4", 0, [0.5])
    runs = report.find_runs([tmp_path / "y", tmp_path / "x"])
    assert [r.path for r in runs] == [first, early, late]
    out = tmp_path / "both"
    assert cli.main(["report", str(tmp_path / "x"), str(tmp_path / "y"), "--out", str(out)]) == 0
    assert "| quaternion | 1 | 1 |" in capsys.readouterr().out
    (tmp_path / "z" / "empty" / "er").mkdir(parents=True)
    with pytest.raises(report.ReportError) as error:
        report.find_runs([tmp_path / "x", tmp_path / "z"])
    assert str(error.value) == (
        f"{tmp_path / 'z'} holds no quatnn runs (no folder with config.toml and "
        "metrics.jsonl at any depth)"
    )


def test_lottery_table_shows_no_spread_for_a_single_seed():
    level = {"variant": "real", "level": 0, "real_percent": 100.0, "weights_percent": 100.0}
    one = {**level, "control": None, "runs": 1, "acc": 0.9, "acc_std": 0.0}
    two = {**level, "level": 1, "control": None, "runs": 2, "acc": 0.8, "acc_std": 0.01}
    table = level_table([one, two])
    assert "| 90.00 (n=1) |" in table and "| 80.00 ± 1.00 (n=2) |" in table


# ---------------------------------------------------------------- report


def _run(folder: Path, variant: str, seed: int, accs: list[float], params: int | None,
         model: str = "conv2", options: dict | None = None) -> Path:  # fmt: skip
    """A run folder as quatnn train writes it (params None: unfinished)."""
    folder.mkdir(parents=True)
    text = f'model = "{model}"\nvariant = "{variant}"\ndataset = "cifar10"\nseed = {seed}\n'
    if options:
        text += "\n[options]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in options.items())
    (folder / "config.toml").write_text(text)
    rows = [{"epoch": e, "train_acc": a, "test_acc": a, "train_loss": 1.0, "test_loss": 1.0,
             "epoch_seconds": 1.0, "samples_per_second": 10.0}
            for e, a in enumerate(accs, 1)]  # fmt: skip
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if params is not None:
        (folder / "summary.json").write_text(json.dumps({"params": params}))
    return folder


def _rows(*paths: Path) -> dict:
    from quatnn import report
    from quatnn.report.table import summarize

    return {row["label"]: row for row in summarize(report.find_runs(paths))}


def test_ratio_refers_to_real4_before_real3(tmp_path):
    _run(tmp_path / "real3-s0", "real3", 0, [0.5], 3000)
    _run(tmp_path / "real4-s0", "real4", 0, [0.5], 4000)
    _run(tmp_path / "quaternion-s0", "quaternion", 0, [0.5], 1000)
    rows = _rows(tmp_path)
    assert rows["quaternion"]["reference"] == "real4"
    assert rows["quaternion"]["ratio"] == pytest.approx(1000 / 4000)
    assert rows["real3"]["ratio"] == pytest.approx(3000 / 4000)


def test_ratio_refers_to_the_real_model_with_the_same_options(tmp_path):
    _run(tmp_path / "a", "real4", 0, [0.5], 4000, options={"width_mult": 1.0})
    _run(tmp_path / "b", "real4", 0, [0.5], 1000, options={"width_mult": 0.5})
    _run(tmp_path / "c", "quaternion", 0, [0.5], 300, options={"width_mult": 0.5})
    rows = _rows(tmp_path)
    (quaternion,) = [r for r in rows.values() if r["variant"] == "quaternion"]
    assert quaternion["ratio"] == pytest.approx(300 / 1000)


def test_ratio_refers_to_the_unpruned_real_model_even_when_only_a_pruned_level_is_there(
    tmp_path,
):
    level = _run(tmp_path / "lot" / "real4-s0" / "level-01", "real4", 0, [0.5], 4000)
    sparsity = {"level": 1, "control": None, "reference": "real4",
                "params": {"total": 4000, "remaining": 2000}}  # fmt: skip
    (level / "sparsity.json").write_text(json.dumps(sparsity))
    _run(tmp_path / "quaternion-s0", "quaternion", 0, [0.5], 1000)
    rows = {r["variant"]: r for r in _rows(level, tmp_path / "quaternion-s0").values()}
    assert rows["real4"]["params"] == 2000
    assert rows["real4"]["ratio"] == pytest.approx(2000 / 4000)
    assert rows["quaternion"]["ratio"] == pytest.approx(1000 / 4000)


def test_epochs_column_is_the_most_epochs_of_any_run_of_the_row(tmp_path):
    _run(tmp_path / "real4-s0", "real4", 0, [0.5, 0.6, 0.7], 4000)
    _run(tmp_path / "real4-s1", "real4", 1, [0.5], None)  # unfinished, after 1 epoch
    row = _rows(tmp_path)["real4"]
    assert (row["runs"], row["unfinished"], row["epochs"]) == (2, 1, 3)


def test_lottery_level_spread_is_the_sample_std():
    from quatnn.report.lottery import summarize_levels

    base = {"variant": "real", "control": None, "level": 1, "real_percent": 50.0,
            "params_percent": 50.0, "weights_percent": 50.0, "best_epoch": 1}  # fmt: skip
    accs = [0.6, 0.7, 0.95]
    (row,) = summarize_levels([{**base, "final_acc": a, "best_acc": a} for a in accs])
    assert row["acc"] == pytest.approx(statistics.mean(accs))
    assert row["acc_std"] == pytest.approx(statistics.stdev(accs))


def _level(folder: Path, seed: int, final: float, best: float, epoch: int, val: bool) -> None:
    """A finished lottery level as quatnn lottery writes it (``val``: it held out a
    validation set)."""
    _run(folder, "real", seed, [best, final], None)
    summary = {"final_test_acc": final, "best_test_acc": best, "best_epoch": epoch}
    (folder / "summary.json").write_text(
        json.dumps(summary | ({"best_val_acc": 0.9} if val else {}))
    )
    counts = {"real_params": {"percent_remaining": 50.0}, "params": {"percent_remaining": 50.0},
              "prunable": {"percent_remaining": 40.0}, "reference": "real",
              "layers": [{"name": "fc1", "percent_remaining": 30.0 + seed}]}  # fmt: skip
    (folder / "sparsity.json").write_text(json.dumps(counts))


def test_a_lottery_with_a_validation_set_reports_its_early_stopping_epochs(tmp_path):
    from quatnn.report.lottery import write_lottery_report

    (tmp_path / "lottery.toml").write_text('model = "lenet_300_100"\n\n[lottery]\nrate = 0.5\n')
    for seed in (0, 1):
        _level(
            tmp_path / f"real-s{seed}" / "level-01", seed, 0.6, 0.8 + 0.02 * seed, 2 + seed, True
        )
    result = write_lottery_report(tmp_path)
    header, _, row = result.table.splitlines()
    assert header.endswith("| ticket acc (%) | ticket best epoch |")
    assert row.endswith("| 81.00 ± 1.41 (n=2) | 2.5 |")  # test accuracy at the chosen epochs
    assert (
        "early-stopping epoch (of its best validation accuracy"
        in (tmp_path / "lottery.md").read_text()
    )
    recipe = 'model = "lenet_300_100"\nbest_by = "loss"\n\n[lottery]\nrate = 0.5\n'
    (tmp_path / "lottery.toml").write_text(recipe)
    write_lottery_report(tmp_path)
    assert "(of its lowest validation loss" in (tmp_path / "lottery.md").read_text()
    # a level without a validation set among them: the last epoch's accuracy, as before
    _level(tmp_path / "real-s2" / "level-01", 2, 0.6, 0.9, 2, False)
    header, _, row = write_lottery_report(tmp_path).table.splitlines()
    assert "epoch" not in header and row.endswith("| 60.00 ± 0.00 (n=3) |")


def test_several_lotteries_share_one_report_labelled_by_what_differs(tmp_path, capsys):
    from quatnn.report.lottery import write_lotteries_report

    for name, rate, final in (("a", 0.5, 0.6), ("b", 0.2, 0.7)):
        (tmp_path / name).mkdir()
        recipe = f'model = "lenet_300_100"\nseeds = [0]\n\n[lottery]\nrate = {rate}\n'
        (tmp_path / name / "lottery.toml").write_text(recipe)
        for seed in (0, 1):
            level = tmp_path / name / f"real-s{seed}" / "level-01"
            _level(level, seed, final + 0.02 * seed, 0.9, 2, False)
    result = write_lotteries_report([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    header, _, first, second = result.table.splitlines()
    assert header.startswith("| lottery | variant | level |")
    assert first.startswith("| rate=0.5 | real | 1 |") and "| 61.00 ± 1.41 (n=2) |" in first
    assert second.startswith("| rate=0.2 | real | 1 |") and "| 71.00 ± 1.41 (n=2) |" in second
    markdown = (tmp_path / "out" / "lottery.md").read_text()
    assert "| layer | real (rate=0.5) (%) | real (rate=0.2) (%) |" in markdown
    assert all((tmp_path / "out" / name).is_file() for name in ("lottery.png", "lottery.json"))
    # the same recipe twice: told apart by folder name; the command wants --out
    (tmp_path / "b" / "lottery.toml").write_text((tmp_path / "a" / "lottery.toml").read_text())
    assert cli.main(["report", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "several lotteries needs --out" in capsys.readouterr().err
    argv = ["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o2")]
    assert cli.main(argv) == 0
    assert "| a | real | 1 |" in capsys.readouterr().out


def test_weights_left_per_layer_are_the_tickets_means_at_the_deepest_common_level():
    from quatnn.report.lottery import layer_levels, layer_table

    def row(variant, seed, level, layers, control=None):
        return {"variant": variant, "seed": seed, "level": level, "control": control,
                "layers": layers}  # fmt: skip

    rows = [
        row("real4", 0, 1, {"conv": 50.0, "head": 90.0}),
        row("real4", 1, 1, {"conv": 40.0, "head": 80.0}),
        row("real4", 0, 1, {"conv": 1.0, "head": 1.0}, control="random"),  # not a ticket
        row("real4", 0, 2, {"conv": 20.0, "head": 70.0}),  # one variant's level 2 only
        row("quaternion", 0, 1, {"conv": 60.0, "head": 70.0}),
    ]
    layers = layer_levels(rows)
    assert layers["real4"][1] == {"conv": 45.0, "head": 85.0}
    level, table = layer_table(layers)
    assert level == 1
    assert table.splitlines() == [
        "| layer | real4 (%) | quaternion (%) |",
        "|---|---|---|",
        "| conv | 45.00 | 60.00 |",
        "| head | 85.00 | 70.00 |",
    ]


def test_lottery_levels_read_the_final_accuracy_for_the_final_metric(tmp_path):
    from quatnn.report.lottery import read_levels, summarize_levels

    _level(tmp_path / "real-s0" / "level-01", 0, final=0.6, best=0.8, epoch=1, val=False)
    (row,) = read_levels(tmp_path)
    assert (row["final_acc"], row["best_acc"], row["validated"]) == (0.6, 0.8, False)
    assert summarize_levels([row], "final")[0]["acc"] == 0.6
    assert summarize_levels([row], "best")[0]["acc"] == 0.8
