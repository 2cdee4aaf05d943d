"""The quatnn command end to end: help, train, compare, report, models, bench, errors."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from quatnn import cli, report
from quatnn.train.config import tomllib

METRIC_KEYS = {
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "epoch_seconds",
    "eval_seconds",
    "samples_per_second",
}
SUMMARY_KEYS = {
    "model",
    "variant",
    "dataset",
    "params",
    "epochs",
    "final_test_acc",
    "best_test_acc",
    "total_seconds",
    "device",
    "torch",
    "quatnn",
}
QUIET = ["--progress", "off"]


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Commands run in a temporary folder, so default outputs (runs/...) land there."""
    monkeypatch.chdir(tmp_path)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A finished 2-epoch Lenet-300-100 (real) run on the bundled digits."""
    out = tmp_path_factory.mktemp("runs") / "lenet-real"
    assert cli.main(["train", "--variant", "real", "--epochs", "2", "--out", str(out), *QUIET]) == 0
    return out


def _error_line(capsys, argv: list[str]) -> str:
    """Run the command, check it fails with status 2 and one line, and return the line."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("quatnn: error: ")
    return err


@pytest.mark.parametrize("command", ["train", "compare", "report", "models", "bench"])
def test_help_describes_each_command_with_an_example(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"quatnn {command}" in out and "examples:" in out


def test_help_does_not_load_torch():
    """Every subcommand's --help (and bad usage) answers without importing torch (seconds)."""
    code = (
        "import sys, contextlib, io\n"
        "from quatnn import cli\n"
        "for command in ('train', 'compare', 'lottery', 'report', 'export', 'models'):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        cli.main([command, '--help'])\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'matplotlib') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.mark.parametrize("package", ["quatnn.train", "quatnn.export"])
def test_lazy_package_names_are_what_they_name_after_every_import(package):
    """A public name of a package that imports its names on use must not be a submodule's
    name too: importing the submodule would replace the name with the module."""
    import importlib
    import pkgutil

    pkg = importlib.import_module(package)
    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{package}.{info.name}")
    for name in pkg.__all__:
        value = getattr(pkg, name)
        assert not isinstance(value, types.ModuleType), f"{package}.{name} is a module"
        assert name in dir(pkg)


def test_train_writes_a_complete_run_that_learns(digits_run):
    names = {p.name for p in digits_run.iterdir()}
    assert {
        "config.toml",
        "metrics.jsonl",
        "checkpoint.pt",
        "best.pt",
        "summary.json",
        "train.log",
    } <= names
    assert not [n for n in names if n.endswith(".tmp")]
    rows = _metrics(digits_run)
    assert [row["epoch"] for row in rows] == [1, 2]
    for row in rows:
        assert set(row) == METRIC_KEYS
        assert all(0 <= row[k] <= 1 for k in ("train_acc", "test_acc"))
        assert row["epoch_seconds"] > 0 and row["samples_per_second"] > 0
    assert rows[-1]["test_acc"] > 0.8  # chance is 0.1
    summary = json.loads((digits_run / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    assert summary["params"] == 266_610 and summary["final_test_acc"] == rows[-1]["test_acc"]
    assert summary["best_test_acc"] == max(row["test_acc"] for row in rows)
    assert torch.load(digits_run / "best.pt", weights_only=True)["test_acc"] == max(
        row["test_acc"] for row in rows
    )
    log = (digits_run / "train.log").read_text()
    assert "epoch 2/2" in log and "finished" in log


def test_config_file_reruns_a_run(tmp_path, digits_run, capsys):
    again = tmp_path / "again"
    argv = ["train", "--config", str(digits_run / "config.toml"), "--max-steps", "3"]
    assert cli.main([*argv, "--out", str(again), *QUIET]) == 0
    first = _metrics(again)[0]
    assert first["step"] == 3 and first["lr"] == _metrics(digits_run)[0]["lr"]


def test_python_m_quatnn_train_in_a_subprocess(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--epochs", "1", "--max-steps", "3", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "quatnn", *argv], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "epoch 1/1" in done.stdout and (out / "summary.json").is_file()
    assert done.stderr == ""  # no bars: stderr is not a terminal


def test_a_closed_stdout_does_not_stop_the_run(tmp_path):
    """``quatnn train | head -1``: the reader goes away after the first line; the run
    finishes, and train.log holds every line."""
    out = tmp_path / "run"
    argv = ["train", "--variant", "real", "--epochs", "3", "--max-steps", "36", "--out", str(out)]
    process = subprocess.Popen(
        [sys.executable, "-m", "quatnn", *argv],
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout.readline()
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 2
    assert len(_metrics(out)) == 2 and (out / "summary.json").is_file()
    assert (out / "train.log").read_text().count("epoch ") >= 2


def test_ctrl_c_exits_130_with_how_to_resume(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--variant", "real", "--epochs", "500", "--out", str(out)]
    process = subprocess.Popen(
        [sys.executable, "-m", "quatnn", *argv],
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.endswith(f"resume with: quatnn train --resume {out}")
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    # in an epoch, or (a Ctrl-C held back while the checkpoint was written) right after it
    kept = (f"checkpoint.pt holds epoch {saved};", f"after epoch {saved}, which {out}")
    assert any(text in last for text in kept), last
    assert len(_metrics(out)) == saved  # an epoch's files are written whole or not at all


def test_compare_trains_every_variant_and_seed_then_reports(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--epochs", "2", "--seeds", "0,1", "--out", str(out), *QUIET]
    assert cli.main(argv) == 0
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == ["quaternion-s0", "quaternion-s1", "real-s0", "real-s1"]
    assert all((out / name / "summary.json").is_file() for name in runs)
    assert {p.name for p in out.iterdir() if p.is_file()} >= set(report.FILES)
    table = (out / "report.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[1].startswith("| real | 2 | 2 | 266,610 | 1.000 |")
    assert lines[2].startswith("| quaternion | 2 | 2 | 67,710 | 0.254 |")
    assert "| variant |" in capsys.readouterr().out
    # each run's config.toml as asked, as quatnn train writes it: a base for other variants
    assert 'encoding = "auto"' in (out / "real-s0" / "config.toml").read_text()
    assert "(encoding group4)" in (out / "quaternion-s0" / "train.log").read_text()

    mtime = (out / "real-s0" / "checkpoint.pt").stat().st_mtime_ns
    assert cli.main(argv) == 0  # the same command again: every run is finished
    assert (out / "real-s0" / "checkpoint.pt").stat().st_mtime_ns == mtime
    assert "already holds this run, finished" in capsys.readouterr().out

    line = _error_line(capsys, [*argv, "--lr", "0.1"])
    assert "holds a different comparison (lr = 0.0012 there, 0.1 here)" in line
    command = line.split("continue that one with: ")[1].strip()  # every run is finished
    assert command == f"quatnn compare --config {out / 'compare.toml'} --out {out}"
    assert cli.main([*command.split()[1:], *QUIET]) == 0
    assert (out / "real-s0" / "checkpoint.pt").stat().st_mtime_ns == mtime

    # another seed into the same folder: its recipe names every variant and seed it holds
    assert cli.main([*argv[:4], "2", *argv[5:], "--variants", "real"]) == 0
    recipe = tomllib.loads((out / "compare.toml").read_text())
    assert (recipe["variants"], recipe["seeds"]) == (["real", "quaternion"], [0, 1, 2])


def test_models_prints_the_zoo_table(capsys):
    assert cli.main(["models", "--names", "lenet_300_100,lenet_300_100"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| model | variant | params | ratio to real | MACs |"  # as in the README
    assert out[3] == "| lenet_300_100 | quaternion | 67,710 | 0.2540 | 266,200 |"
    assert len(out) == 4  # a name given twice: its rows once


def test_evaluate_prints_each_class_and_writes_every_number(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--variant", "real", "--epochs", "1", "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    capsys.readouterr()
    saved = tmp_path / "numbers.json"
    assert cli.main(["evaluate", str(run), "--json", str(saved)]) == 0
    out = capsys.readouterr().out.splitlines()
    acc = f"acc {summary['final_test_acc']:.2%}"
    assert out[0] == f"{run} (checkpoint.pt, epoch 1) on 359 test images: " + (
        f"loss {summary['final_test_loss']:.4f}, {acc}"
    )
    assert out[1] == "| class | images | acc (%) | most often taken for |"
    numbers = json.loads(saved.read_text())
    assert len(out) == 3 + 10 + 1 and len(numbers["confusion"]) == 10
    first = numbers["per_class"][0]
    assert out[3].startswith(f"| {first['class']} | {first['images']} | {100 * first['acc']:.2f} |")


def test_a_reader_that_goes_away_ends_the_command_quietly(monkeypatch):
    """``quatnn evaluate RUN | head -1``: status 141, as after a SIGPIPE, no traceback."""

    class Closed(io.StringIO):  # no file descriptor: fileno() raises
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert cli.main(["models", "--names", "lenet_300_100"]) == 141


def test_bench_dispatches_to_the_named_module(monkeypatch, capsys):
    calls = []

    class Fake:
        @staticmethod
        def main(argv):
            calls.append(argv)
            return 3

    monkeypatch.setattr(cli, "_benchmarks", lambda: ["fake"])
    monkeypatch.setattr(cli, "_bench_module", lambda name: Fake)
    assert cli.main(["bench", "fake", "--size", "8", "--help"]) == 3
    assert calls == [["--size", "8", "--help"]]
    assert "unknown benchmark 'nope'; available: fake" in _error_line(capsys, ["bench", "nope"])


def test_bench_layers_times_the_sizes_given(monkeypatch, capsys, tmp_path):
    """--linear/--conv replace the default sizes; every contender runs on each."""
    from quatnn.bench import layers

    ran = []

    def once(fns, device, repeats, min_seconds):
        for fn in fns.values():
            fn()  # each contender really runs
        ran.append(list(fns))
        return {name: 1.0 + i for i, name in enumerate(fns)}

    monkeypatch.setattr(layers, "interleaved_seconds", once)
    out = tmp_path / "t.csv"
    argv = ["bench", "layers", "--linear", "4x8,2x16x12", "--conv", "2x8x4", "--out", str(out)]
    assert cli.main(argv) == 0
    assert ran == [["real", "block", "rank8", "auto"]] * 6  # 3 sizes x (fwd, fwd+bwd)
    names = [line.split(",")[0] for line in out.read_text().splitlines()[1:]]
    assert names == [
        *["linear 8 (batch 4)"] * 2,
        *["linear 16->12 (batch 2)"] * 2,
        *["conv3x3 8ch 4x4 (batch 2)"] * 2,
    ]
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].startswith("| layer | pass | real_ms |")  # one header, each row once
    assert printed[3] == "| linear 8 (batch 4) | fwd | 1e+03 | 2 | 3 | 4 |" and len(printed) == 9
    made = []  # the last tensor run() draws is the timed input
    randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: made.append(randn(*a, **k)) or made[-1])
    assert cli.main(["bench", "layers", "--linear", "4x8", "--input-grad", "--out", str(out)]) == 0
    passes = [line.split(",")[1] for line in out.read_text().splitlines()[1:]]
    assert passes == ["fwd", "fwd+bwd+dx"]
    assert made[-1].shape == (4, 8) and made[-1].grad is not None  # dx was computed


def test_bench_norm_compile_adds_a_compiled_twin_of_each_layer(monkeypatch, capsys):
    from quatnn.bench import norm

    ran, compiled = [], []
    compile_ = torch.compile

    def once(fns, device, repeats, warmup):
        for fn in fns.values():
            fn()  # each layer really runs (the twins compile here)
        ran.append(list(fns))
        return {name: 1.0 + i for i, name in enumerate(fns)}

    monkeypatch.setattr(norm, "interleaved_seconds", once)
    monkeypatch.setattr(torch, "compile", lambda m: compiled.append(m) or compile_(m))
    argv = ["bench", "norm", "--batch", "2", "--channels", "8", "--size", "3", "--modes", "whiten"]
    assert cli.main([*argv, "--compile"]) == 0
    eager = ["nn.BatchNorm2d", "QBatchNorm2d(whiten)"]
    assert ran == [[*eager, *(f"{name}, compiled" for name in eager)]]
    assert [type(m).__name__ for m in compiled] == ["BatchNorm2d", "QBatchNorm2d"]
    assert "| QBatchNorm2d(whiten), compiled | 2x8x3x3 | 4e+03 | 4 |" in capsys.readouterr().out


def test_bench_train_builds_the_models_with_the_options_given(capsys):
    from quatnn import models
    from quatnn.bench import train

    rows = train.run("resnet20", ("quaternion",), batch=2, steps=1, chunk=1,
                     options={"norm": "variance"})  # fmt: skip
    variance = models.count_parameters(models.create("resnet20", "quaternion", norm="variance"))
    assert rows[0]["params"] == variance
    assert variance != models.count_parameters(models.create("resnet20", "quaternion"))
    assert rows[0]["steps_per_s"] > 0 and rows[0]["speed_x"] == 1.0


def test_bench_train_times_exactly_the_steps_asked_for(monkeypatch):
    from quatnn import models
    from quatnn.bench import train

    calls: dict[str, int] = {}
    create = models.create

    def counted(name, variant, **options):
        model = create(name, variant, **options)
        calls[variant] = 0
        model.register_forward_pre_hook(lambda *_: calls.__setitem__(variant, calls[variant] + 1))
        return model

    monkeypatch.setattr(train.models, "create", counted)
    train.run("lenet_300_100", batch=2, steps=25, chunk=20)  # a round of 20, then one of 5
    assert calls == {"real": 4 + 25, "quaternion": 4 + 25}  # 3 warm-up steps, 1 for memory


@pytest.mark.parametrize(
    ("flag", "mode"),
    [
        ([], None),
        (["--compile"], "default"),
        (["--compile", "--compile-mode", "reduce-overhead"], "reduce-overhead"),
    ],
)
def test_bench_train_compiles_every_variant_in_the_mode_given(monkeypatch, capsys, flag, mode):
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode: modes.append(mode) or model)
    argv = ["bench", "train", "--model", "lenet_300_100"]  # real,quaternion: flat input
    assert cli.main([*argv, "--batch", "2", "--steps", "1", *flag]) == 0
    assert modes == ([] if mode is None else [mode, mode])
    printed = capsys.readouterr().out
    assert (f"compiled ({mode})" in printed) == (mode is not None)
    rows = [line.split(" | ")[0] for line in printed.splitlines()[-2:]]
    assert rows == ["| real", "| quaternion"]
    with pytest.raises(SystemExit):
        cli.main([*argv, "--compile", "--compile-mode", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err


@pytest.mark.parametrize("algorithm", ["block", "rank8"])
def test_bench_train_forces_the_algorithm_given(monkeypatch, capsys, algorithm):
    from quatnn import functional

    chosen = []
    resolve = functional._resolve
    monkeypatch.setattr(functional, "_resolve", lambda *a: chosen.append(resolve(*a)) or chosen[-1])
    argv = ["bench", "train", "--model", "lenet_300_100", "--variants", "quaternion"]
    assert cli.main([*argv, "--batch", "2", "--steps", "1", "--algorithm", algorithm]) == 0
    assert f"algorithm {algorithm}" in capsys.readouterr().out
    assert chosen and set(chosen) == {algorithm}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "norm", "--channels", "6", "--repeats", "1"], "positive multiple of 4"),
    ],
)
def test_bench_errors_are_one_line(capsys, argv, message):
    assert message in _error_line(capsys, argv)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "norm", "--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
        (["bench", "train", "--steps", "-3"], "argument --steps: must be at least 1"),
        (["bench", "train", "--model", "nope"], "unknown model 'nope'; valid models: lenet"),
        (["bench", "train", "--variants", "real4,foo"], "unknown variant 'foo'; valid"),
        (["bench", "train", "--variants", ","], "--variants needs at least one variant"),
        (["bench", "train", "--option", "norm=bogus", "--model", "resnet20"], "unknown norm"),
        (["bench", "train", "--option", "norm=whiten"], "conv6: unknown option(s) norm"),
        (["bench", "train", "--option", "norm"], "'norm' must look like KEY=VALUE"),
        (["bench", "layers", "--device", "tpu"], "argument --device: unknown device 'tpu'"),
        (["bench", "layers", "--linear", "8x6"], "'8x6' is not BATCHxWIDTH[xOUT]"),
        (["bench", "layers", "--linear", "8x8x6"], "'8x8x6' is not BATCHxWIDTH[xOUT]"),
        (["bench", "layers", "--linear", "8x8x8x8"], "'8x8x8x8' is not BATCHxWIDTH[xOUT]"),
        (["bench", "layers", "--conv", "2x8"], "'2x8' is not BATCHxCHANNELSxSIZE"),
        (["bench", "layers", "--quick", "--conv", "2x8x4"], "--quick times its own"),
        (["compare", "--variants", ","], "argument --variants: needs at least one"),
        (["models", "--names", ""], "argument --names: needs at least one"),
    ],
)
def test_argument_errors_exit_2_before_anything_runs(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    assert out == ""


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--model", "lenet"], "unknown model 'lenet'; valid models: lenet_300_100"),
        (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["train", "--variant", "real3"], "variant 'real3' does not fit grayscale dataset"),
        (["train", "--variant", "octonion"], "unknown variant 'octonion'"),
        (["train", "--encoding", "hsv"], "unknown encoding 'hsv'"),
        (["train", "--epochs", "0"], "epochs must be at least 1"),
        (["train", "--optimizer", "rmsprop"], "optimizer must be one of adam, adamw, sgd"),
        (["train", "--backend", "glue"], "backend must be auto or a torch.distributed backend"),
        (["train", "--device", "tpu"], "unknown device 'tpu'"),
        (["train", "--option", "width"], "must look like KEY=VALUE"),
        (["train", "--option", "depth=3"], "unknown option(s) depth"),
        (["train", "--option", "quaternion_first=False"], "booleans are true or false"),
        (["train", "--resume", "X", "--overwrite"], "drop --overwrite"),
        (["train", "--resume", "X", "--config", "c.toml"], "drop --config"),
        (["export", "run", "--sparse"], "--sparse applies to --format safetensors only"),
        (["bench"], "bench: name a benchmark: infer, layers, norm, train"),
        (["export", "run", "--format", "safetensors", "--no-fold"], "--no-fold does not apply"),
        (["train", "--config", "missing.toml"], "config file missing.toml does not exist"),
        (["compare", "--seeds", "1,1"], "no variant or seed twice"),
        (["lottery", "--rates", "garbage"], "--rates takes TYPE=RATE pairs"),
        (["models", "--names", "nope"], "unknown model 'nope'"),
    ],
)
def test_bad_input_gives_one_line_and_status_2(capsys, argv, message):
    assert message in _error_line(capsys, argv)


def test_run_folder_errors(tmp_path, capsys, digits_run):
    def run(*argv: str) -> str:
        return _error_line(capsys, ["train", *argv, *QUIET])

    same = ["--variant", "real", "--epochs", "2", "--out", str(digits_run)]
    assert "holds a different run (lr = 0.0012 there, 0.1 here)" in run(*same, "--lr", "0.1")
    line = run("--variant", "quaternion", "--epochs", "2", "--out", str(digits_run))
    # the saved auto encoding is compared as what it resolved to for that run
    assert "(variant = 'real' there, 'quaternion' here, encoding = 'identity' there" in line
    assert "already holds this run, finished; use --overwrite" in run(*same)
    assert f"nothing to resume: {tmp_path} holds no run" in run("--resume", str(tmp_path))
    (tmp_path / "notes.txt").write_text("mine")
    line = run("--out", str(tmp_path), "--overwrite")
    assert "holds no quatnn run (no config.toml), not a run; choose another --out" in line
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "compare.toml").write_text("")  # a comparison (of no runs yet)
    line = run("--resume", str(tmp_path))
    assert "holds a comparison, not a run; --resume takes the folder of one run" in line
    line = _error_line(capsys, ["compare", "--out", str(digits_run), *QUIET])
    assert f"{digits_run} holds a run, not a comparison; choose another --out" in line
    line = run("--dataset", "mnist", "--data-dir", str(tmp_path / "none"), "--no-download")
    assert "dataset 'mnist' not found" in line
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = ")
    assert "cannot read config file" in run("--config", str(bad))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda path: path.write_bytes(b"PK\x03\x04 not a zip"), "is corrupt or not a checkpoint"),
        (lambda path: torch.save({"model": {}}, path), "is not a quatnn checkpoint"),
        (lambda path: path.write_bytes(b""), "is corrupt or not a checkpoint"),
        (lambda path: path.write_bytes(b"garbage\n"), "not a checkpoint (Unsupported operand"),
        (lambda path: path.unlink(), "no checkpoint.pt to resume from"),
        (  # half a file: the cause, without torch's advice after it
            lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
            "(PytorchStreamReader failed reading zip archive: failed finding central directory)",
        ),
    ],
)
def test_damaged_checkpoint_is_refused_on_resume(tmp_path, capsys, damage, message):
    out = tmp_path / "run"
    argv = ["train", "--variant", "real", "--epochs", "2", "--max-steps", "2", "--out", str(out)]
    assert cli.main([*argv, *QUIET]) == 0
    (out / "summary.json").unlink()  # as if it had been interrupted
    damage(out / "checkpoint.pt")
    line = _error_line(capsys, ["train", "--resume", str(out), *QUIET])
    assert message in line and "weights_only" not in line  # not torch's unsafe advice
    assert (out / "config.toml").is_file() and len(_metrics(out)) == 1  # nothing lost


def test_foreign_checkpoint_is_refused(tmp_path, capsys):
    runs = {}
    for variant in ("real", "quaternion"):
        runs[variant] = tmp_path / variant
        argv = ["train", "--variant", variant, "--max-steps", "2", "--out", str(runs[variant])]
        assert cli.main([*argv, *QUIET]) == 0
        (runs[variant] / "summary.json").unlink()
    os.replace(runs["quaternion"] / "checkpoint.pt", runs["real"] / "checkpoint.pt")
    line = _error_line(capsys, ["train", "--resume", str(runs["real"]), *QUIET])
    assert "belongs to another run (lenet_300_100/quaternion/digits, expected" in line


def test_tensorboard_flag(tmp_path, capsys):
    argv = ["train", "--max-steps", "2", "--tensorboard", "--out", str(tmp_path / "r"), *QUIET]
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert "needs the tensorboard package" in _error_line(capsys, argv)
        assert not (tmp_path / "r").exists()
    else:
        assert cli.main(argv) == 0
        assert any((tmp_path / "r" / "tensorboard").iterdir())


def test_ctrl_c_while_the_command_loads_is_one_line(monkeypatch, capsys):
    """The console script imports the command (and torch) inside main: Ctrl-C there is
    status 130 and one line. `import quatnn` alone loads no torch, so the script can."""
    from quatnn import launch

    class Loading(types.ModuleType):
        def __getattr__(self, name: str) -> object:
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "quatnn.cli", Loading("quatnn.cli"))
    assert launch.main(["models"]) == 130
    assert capsys.readouterr().err == "quatnn: interrupted\n"
    code = "import sys, quatnn; print('torch' in sys.modules, quatnn.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "False"


def test_ctrl_c_while_a_command_imports_torch_is_one_line(monkeypatch, capsys):
    """An interrupt inside a handler is reported before the bad-input errors are looked up
    (their lookup imports torch, which the interrupt may have left half-loaded)."""

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_models", interrupted)
    monkeypatch.setitem(sys.modules, "quatnn.data.registry", None)  # importing it fails
    assert cli.main(["models"]) == 130
    assert capsys.readouterr().err == "quatnn: interrupted\n"


def test_a_path_that_cannot_be_written_is_one_line(tmp_path, capsys, digits_run):
    afile = tmp_path / "afile"
    afile.write_text("")
    line = _error_line(capsys, ["report", str(digits_run), "--out", str(afile / "report")])
    assert "Not a directory" in line and str(afile) in line
    line = _error_line(capsys, ["evaluate", str(digits_run), "--json", str(afile / "x.json")])
    assert "Not a directory" in line
