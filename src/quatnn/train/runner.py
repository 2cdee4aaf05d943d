"""Run folders: create, refuse or resume them, train one run, compare variants x seeds.

A run folder holds ``config.toml`` (the config as asked for, checked: an ``auto``
encoding stays ``auto``, so that the file serves other variants too; ``quatnn train
--config`` runs it again; ``summary.json`` and ``train.log`` name the encoding used),
``metrics.jsonl`` (one JSON object per epoch), ``checkpoint.pt`` (the state after the
last completed epoch, written atomically), ``best.pt`` (the weights of the best epoch:
that of the highest accuracy, or with ``best_by = "loss"`` the lowest loss, on the
validation set with ``val_split``, else on the test set), ``train.log`` (the log lines)
and, once finished, ``summary.json``. A compare folder holds ``compare.toml`` and one run
folder per variant and seed, named ``<variant>-s<seed>``.

Example:
    >>> import tempfile
    >>> cfg = TrainConfig(variant="real", epochs=1, max_steps=5)
    >>> summary = train(cfg, tempfile.mkdtemp(), progress="off")  # doctest: +ELLIPSIS
    lenet_300_100 real on digits ...
    >>> summary["steps"], summary["params"]
    (5, 266610)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import signal
import statistics
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

try:
    import fcntl
except ImportError:  # (not on Windows: run folders are not locked there)
    fcntl = None

import torch
from torch.utils.data import DataLoader, Dataset

import quatnn
from quatnn import data, models
from quatnn.metrics import best_row
from quatnn.nn.sync_norm import convert_sync_batchnorm
from quatnn.train import checkpoint, distributed
from quatnn.train import device as devices
from quatnn.train.config import (
    COMPARE_KEYS,
    DEFAULT_SEEDS,
    RUNTIME_FIELDS,
    TrainConfig,
    continued_runs,
    dumps_toml,
    load_toml,
    merge,
)
from quatnn.train.errors import Interrupted, NonFiniteLoss, RunError
from quatnn.train.loop import Callback, Trainer, lr_schedule
from quatnn.train.progress import Progress, bars_wanted
from quatnn.train.seeding import EpochSampler, SeededDataset, seed_everything, seed_worker

RUNTIME_FLAGS = tuple("--" + name.replace("_", "-") for name in RUNTIME_FIELDS)
IF_EXISTS = ("refuse", "resume", "continue", "overwrite")
"""What :func:`train` does with a run already in ``out``: ``refuse`` (RunError),
``resume`` (continue it; RunError if there is none), ``continue`` (resume it, skip it if
finished, or start a new one), ``overwrite`` (delete it and start again)."""
TOP5_ABOVE = 10
"""Runs on datasets of more classes than this also measure top-5 accuracy."""


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Check ``cfg`` (values, model, dataset and variant names) and fill in the encoding.

    >>> resolve(TrainConfig(model="conv2", dataset="digits-color", variant="real4")).encoding
    'rgb_gray'
    """
    cfg.validate()
    if cfg.variant not in models.VARIANTS:
        raise RunError(f"unknown variant {cfg.variant!r}; variants: {', '.join(models.VARIANTS)}")
    try:
        flat = models.spec(cfg.model).input_kind == "flat"
        info = data.info(cfg.dataset, cfg.data_dir)
        encoding = data.default_encoding(info, cfg.variant, flat=flat)
    except (ValueError, data.DatasetMissingError) as err:
        raise RunError(str(err)) from None
    if cfg.encoding != "auto":
        if cfg.encoding not in data.ENCODINGS:
            valid = ", ".join(["auto", *data.ENCODINGS])
            raise RunError(f"unknown encoding {cfg.encoding!r}; encodings: {valid}")
        encoding = cfg.encoding
    return dataclasses.replace(cfg, encoding=encoding)


def default_variants(dataset: str) -> tuple[str, ...]:
    """``real3, real4, quaternion`` for colour data, ``real, quaternion`` for grayscale."""
    try:
        color = data.is_color(dataset)
    except ValueError as err:
        raise RunError(str(err)) from None
    return ("real3", "real4", "quaternion") if color else ("real", "quaternion")


def default_run_dir(cfg: TrainConfig) -> Path:
    """``runs/<model>-<variant>-<dataset>-s<seed>``, where a run goes unless told."""
    return Path("runs") / f"{cfg.model}-{cfg.variant}-{cfg.dataset}-s{cfg.seed}"


def resume_config(run_dir: str | Path, overrides: Mapping[str, object]) -> TrainConfig:
    """The config of the run in ``run_dir`` with ``overrides`` applied (RunError if
    ``run_dir`` holds no run); :func:`train` then refuses overrides that change the run."""
    saved = _saved_config(Path(run_dir), remedy="--resume takes the folder of one run")
    if saved is None:
        raise RunError(f"nothing to resume: {run_dir} holds no run")
    return merge(saved, overrides, "command line")


def _differences(saved: dict, wanted: dict) -> str:
    keys = [k for k in dict.fromkeys([*saved, *wanted]) if saved.get(k) != wanted.get(k)]
    return ", ".join(f"{k} = {saved.get(k)!r} there, {wanted.get(k)!r} here" for k in keys[:3])


# The file that marks each kind of quatnn folder, and what to call that kind.
_FOLDERS = {"config.toml": "a run", "compare.toml": "a comparison", "lottery.toml": "a lottery"}


def _saved_config(
    out: Path, marker: str = "config.toml", remedy: str = "choose another --out"
) -> TrainConfig | None:
    """The config of the run (or with ``marker`` ``compare.toml``, the comparison) in
    ``out`` (None if ``out`` is absent or empty); RunError, ending in ``remedy``, if ``out``
    holds something else."""
    if out.exists() and not out.is_dir():
        raise RunError(f"{out} is a file, not a run folder")
    if not out.exists() or not any(out.iterdir()):
        return None
    path = out / marker
    if not path.is_file():
        held = next((kind for name, kind in _FOLDERS.items() if (out / name).is_file()), None)
        what = f"no quatnn run (no {marker})" if held is None else held
        raise RunError(f"{out} holds {what}, not {_FOLDERS[marker]}; {remedy}")
    values = {k: v for k, v in load_toml(path).items() if k not in COMPARE_KEYS}
    return TrainConfig.from_dict(values, source=str(path))


def _plan(out: Path, cfg: TrainConfig, if_exists: str) -> str:
    """``new``, ``overwrite``, ``resume`` or ``finished``: what to do with ``out`` for the
    resolved ``cfg``."""
    if if_exists not in IF_EXISTS:
        raise ValueError(f"if_exists must be one of {', '.join(IF_EXISTS)}")
    saved = _saved_config(out)
    if saved is None:
        if if_exists == "resume":
            raise RunError(f"nothing to resume: {out} holds no run")
        return "new"
    if saved.encoding == "auto":  # compare the encoding the saved run trains with
        with contextlib.suppress(RunError):  # a saved run that no longer resolves differs
            saved = dataclasses.replace(saved, encoding=resolve(saved).encoding)
    if if_exists == "overwrite":
        return "overwrite"
    finished = (out / "summary.json").is_file()
    differences = _differences(saved.identity(), cfg.identity())
    if differences:
        hint = (
            f"a resumed run continues unchanged; only {', '.join(RUNTIME_FLAGS)} may change"
            if if_exists == "resume"
            else "use --overwrite to replace it, or another --out"
        )
        raise RunError(f"{out} holds a different run ({differences}); {hint}")
    if if_exists == "refuse":
        if finished:
            raise RunError(
                f"{out} already holds this run, finished; use --overwrite to "
                "train it again, or another --out"
            )
        raise RunError(
            f"{out} already holds this run, unfinished; continue it with "
            f"--resume {out}, or start again with --overwrite"
        )
    return "finished" if finished else "resume"


def _datasets(
    cfg: TrainConfig, download: bool, training: bool = True
) -> tuple[data.DatasetInfo, Dataset | None, Dataset, Dataset | None]:
    """The dataset's info and its train, test and validation sets (None without
    ``val_split``; ``training=False``: the test set alone, no training file read)."""
    try:
        info = data.info(cfg.dataset, cfg.data_dir)
        common = {"encoding": cfg.encoding, "download": download}
        test_set = data.load(cfg.dataset, cfg.data_dir, train=False, augment=False, **common)
        if not training:
            return info, None, test_set, None
        train_set = data.load(cfg.dataset, cfg.data_dir, train=True, augment=cfg.augment, **common)
        val_set = None
        if cfg.val_split:
            plain = data.load(  # the same images, read once
                cfg.dataset, cfg.data_dir, train=True, augment=False, images=train_set, **common
            )
            train_set, val_set = data.validation_split(train_set, plain, cfg.val_split)
    except (ValueError, data.DatasetMissingError) as err:
        raise RunError(str(err)) from None
    return info, train_set, test_set, val_set


def _model(cfg: TrainConfig, info: data.DatasetInfo, sample: torch.Tensor) -> torch.nn.Module:
    """The model for ``cfg``, its input read off one encoded ``sample``."""
    if models.spec(cfg.model).input_kind == "flat":
        size = info.image_size
        in_channels = sample.numel() // (size[0] * size[1])
    else:
        in_channels, size = sample.shape[0], tuple(sample.shape[1:])
    try:
        return models.create(
            cfg.model,
            cfg.variant,
            num_classes=info.num_classes,
            in_channels=in_channels,
            input_size=size,
            **cfg.options,
        )
    except (ValueError, TypeError) as err:
        raise RunError(
            f"cannot build {cfg.model} ({cfg.variant}) for {cfg.dataset} with "
            f"encoding {cfg.encoding}: {err}"
        ) from None


def _optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params, wd = model.parameters(), cfg.weight_decay
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=wd)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=wd)


def _tensorboard_writer_class() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RunError(
            "--tensorboard needs the tensorboard package: pip install tensorboard"
        ) from None
    return SummaryWriter


def epoch_line(row: dict, epochs: int) -> str:
    """The log line of one metrics row (with the validation scores and the top-5
    accuracies where it has them).

    >>> row = {"epoch": 2, "train_loss": 0.5, "train_acc": 0.9, "test_loss": 0.4,
    ...        "test_acc": 0.91, "lr": 1e-3, "epoch_seconds": 1.5, "samples_per_second": 900.0}
    >>> for part in epoch_line(row, 10).split("  "):
    ...     print(part)
    epoch 2/10
    train loss 0.5000 acc 90.00%
    test loss 0.4000 acc 91.00%
    lr 1.0e-03
    1.5 s
    900 samples/s
    """

    def scores(split: str) -> str:
        top5 = f" top-5 {row[f'{split}_top5']:.2%}" if f"{split}_top5" in row else ""
        return f"{split} loss {row[f'{split}_loss']:.4f} acc {row[f'{split}_acc']:.2%}{top5}  "

    return (
        f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f} "
        f"acc {row['train_acc']:.2%}  {scores('val') if 'val_acc' in row else ''}"
        f"{scores('test')}lr {row['lr']:.1e}  {row['epoch_seconds']:.1f} s  "
        f"{row['samples_per_second']:.0f} samples/s"
    )


class RunWriter(Callback):
    """Writes each epoch to the run folder: a metrics row, a log line, TensorBoard
    scalars, ``best.pt`` on a new best epoch (``best_row``), then ``checkpoint.pt`` (both
    with the names of the output ``classes``); a Ctrl-C or SIGTERM meanwhile waits until
    all of them are written."""

    def __init__(
        self,
        out: Path,
        cfg: TrainConfig,
        progress: Progress,
        tensorboard: object,
        classes: Sequence[str],
    ) -> None:
        self.out, self.cfg, self.progress, self.tensorboard = out, cfg, progress, tensorboard
        self.classes = list(classes)
        self.saved_epoch = 0  # the epoch checkpoint.pt holds

    def on_train_start(self, trainer: Trainer) -> None:
        self.saved_epoch = trainer.epoch

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        with checkpoint.signals_deferred():  # an interrupt lands after all of it
            self._write_epoch(trainer, row)

    def _write_epoch(self, trainer: Trainer, row: dict) -> None:
        with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        self.progress.write(epoch_line(row, self.cfg.epochs))
        if self.tensorboard is not None:
            for key, value in row.items():
                if key not in ("epoch", "step"):
                    self.tensorboard.add_scalar(key, value, row["epoch"])
            self.tensorboard.flush()
        if best_row(trainer.history, self.cfg.best_by) is row:
            scores = {
                k: row[k] for k in ("val_loss", "val_acc", "test_loss", "test_acc") if k in row
            }
            state = {"epoch": row["epoch"], **scores, "model": trainer.model.state_dict()}
            _save(self.out / "best.pt", self.cfg, state, self.classes)
        _save(self.out / "checkpoint.pt", self.cfg, trainer.state_dict(), self.classes)
        self.saved_epoch = row["epoch"]


def _save(path: Path, cfg: TrainConfig, state: dict, classes: list[str]) -> None:
    """Save the checkpoint ``state`` of run ``cfg`` with the names of the model's output
    classes (exports record them)."""
    checkpoint.save(path, cfg.to_dict(), {**state, "classes": classes})


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (``kill``, a cluster's time limit) into KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _summary(cfg: TrainConfig, trainer: Trainer, device: torch.device, world_size: int) -> dict:
    history = trainer.history
    best = best_row(history, cfg.best_by)
    extra = {"best_val_acc": best["val_acc"]} if "val_acc" in best else {}
    if "test_top5" in history[-1] and "test_top5" in best:
        extra |= {"final_test_top5": history[-1]["test_top5"], "best_test_top5": best["test_top5"]}
    timed = history[1:] or history  # the first epoch includes warm-up
    return {
        "model": cfg.model,
        "variant": cfg.variant,
        "dataset": cfg.dataset,
        "encoding": cfg.encoding,
        "seed": cfg.seed,
        "params": models.count_parameters(trainer.model),
        "epochs": len(history),
        "steps": trainer.step,
        "final_test_acc": history[-1]["test_acc"],
        "final_test_loss": history[-1]["test_loss"],
        "final_train_acc": history[-1]["train_acc"],
        "best_test_acc": best["test_acc"],
        "best_epoch": best["epoch"],
        **extra,
        "total_seconds": sum(r["epoch_seconds"] + r["eval_seconds"] for r in history),
        "seconds_per_epoch": statistics.fmean(r["epoch_seconds"] for r in timed),
        "samples_per_second": statistics.fmean(r["samples_per_second"] for r in timed),
        "device": devices.describe(device),
        "world_size": world_size,
        "amp": str(trainer.amp_dtype).removeprefix("torch.") if trainer.amp_dtype else "off",
        "torch": torch.__version__,
        "quatnn": quatnn.__version__,
        "python": platform.python_version(),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@contextlib.contextmanager
def _folder_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on run folder ``out`` (created if need be) meanwhile: a second
    process training in it (a ``--resume`` while the run still trains) gets a RunError
    instead of writing its epochs into the same files. Released when the process ends."""
    out.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(
                f"another process is training in {out}; wait for it to finish, or stop it "
                "and resume"
            ) from None
        yield
    finally:
        os.close(fd)


def _prepare_folder(
    out: Path, cfg: TrainConfig, encoding: str, plan: str, trainer: Trainer, classes: list[str]
) -> None:
    """Clear or bring up to date the (locked) run folder before the first epoch;
    ``config.toml`` gets the ``encoding`` asked for."""
    if plan == "overwrite":  # its contents: the folder itself holds the lock
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    checkpoint.remove_leftovers(out)  # of a process killed while writing
    if trainer.epoch == 0:
        asked = dataclasses.replace(cfg, encoding=encoding).to_dict()
        (out / "config.toml").write_text(dumps_toml(asked), encoding="utf-8")
        (out / "metrics.jsonl").write_text("", encoding="utf-8")
        for stale in ("best.pt", "summary.json"):
            (out / stale).unlink(missing_ok=True)
        _save(out / "checkpoint.pt", cfg, trainer.state_dict(), classes)
    else:  # the metrics of the epochs the checkpoint holds, none from a lost epoch
        rows = "".join(json.dumps(row) + "\n" for row in trainer.history)
        checkpoint.write_atomic(out / "metrics.jsonl", lambda f: f.write(rows), mode="w")


def _loaders(
    cfg: TrainConfig,
    info: data.DatasetInfo,
    train_set: Dataset,
    test_set: Dataset,
    val_set: Dataset | None,
    device: torch.device,
    ctx: distributed.Context,
) -> tuple[DataLoader, DataLoader, DataLoader | None]:
    """The train, test and validation loaders; with several processes, this process's
    share of each global batch and its part of the test and validation sets."""
    options = devices.loader_options(device, cfg.workers, info.bundled, ctx.local_world_size)
    common = {"worker_init_fn": seed_worker, **options}
    sampler = EpochSampler(len(train_set), cfg.seed)
    batches = {"batch_size": cfg.batch_size, "sampler": sampler}
    if ctx.enabled:
        shares = distributed.ShardedBatchSampler(sampler, cfg.batch_size, ctx.rank, ctx.world_size)
        batches = {"batch_sampler": shares}
    train_loader = DataLoader(
        SeededDataset(train_set, cfg.seed),
        generator=torch.Generator().manual_seed(cfg.seed),
        **batches,
        **common,
    )

    def evaluation(dataset: Dataset) -> DataLoader:
        shard = {}
        if ctx.enabled:
            shard = {"sampler": distributed.ShardSampler(len(dataset), ctx.rank, ctx.world_size)}
        return DataLoader(
            dataset,
            batch_size=cfg.eval_batch_size,
            generator=torch.Generator().manual_seed(cfg.seed),
            **shard,
            **common,
        )

    val_loader = None if val_set is None else evaluation(val_set)
    return train_loader, evaluation(test_set), val_loader


def _prepare_model(
    cfg: TrainConfig, model: torch.nn.Module, device: torch.device, ctx: distributed.Context
) -> torch.nn.Module:
    """``model`` with synchronized batch norms (``sync_bn``, several processes), on
    ``device``, in channels-last layout (``channels_last``)."""
    if cfg.sync_bn and ctx.enabled:
        model = convert_sync_batchnorm(model)
        real = any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
        if real and device.type != "cuda":
            raise RunError(
                f"--sync-bn: {cfg.model} ({cfg.variant}) has real batch norms, and torch's "
                f"SyncBatchNorm trains on CUDA only, not on {device.type}; drop --sync-bn "
                "or train on GPUs"
            )
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    if_exists: str = "refuse",
    progress: str = "auto",
    tensorboard: bool = False,
    download: bool = True,
    callbacks: Sequence[Callback] = (),
    is_main: bool = True,
    resume_command: str | None = None,
) -> dict:
    """Train the run ``cfg`` in folder ``out`` and return its summary.

    ``if_exists`` says what to do with a run already in ``out`` (:data:`IF_EXISTS`).
    ``progress`` is ``auto``, ``on`` or ``off`` (bars; log lines are always printed).
    ``callbacks`` run before the folder is written at each epoch end. ``is_main=False``
    writes nothing and prints nothing. ``resume_command`` is what the interrupt message
    tells to run (default ``quatnn train --resume OUT``; a lottery level names its lottery).

    Inside a process group (:func:`quatnn.train.distributed.session` under torchrun) every
    process calls this with the same arguments: they train one run with
    DistributedDataParallel, and only rank 0 writes and prints (see
    :mod:`quatnn.train.distributed`).

    Everything is checked before the folder is touched. Raises RunError for bad input,
    Interrupted on Ctrl-C or SIGTERM (``checkpoint.pt`` then holds the last completed
    epoch) and NonFiniteLoss when the loss becomes NaN or infinite (training stops; the
    checkpoint of the last good epoch is kept).
    """
    encoding, cfg, out = cfg.encoding, resolve(cfg), Path(out)
    ctx = distributed.current()
    if cfg.batch_size % ctx.world_size:
        raise RunError(
            f"batch_size {cfg.batch_size} is not divisible by the {ctx.world_size} processes: "
            "each optimizer step splits one global batch evenly among them"
        )
    is_main = is_main and ctx.is_main
    plan = _plan(out, cfg, if_exists)
    view = Progress(bars_wanted(progress), quiet=not is_main)
    if plan == "finished":
        view.write(f"{out} already holds this run, finished; see {out / 'summary.json'}")
        return json.loads((out / "summary.json").read_text(encoding="utf-8"))
    writer_class = _tensorboard_writer_class() if tensorboard and is_main else None
    device = distributed.process_device(cfg.device, ctx.local_rank, ctx.world_size)
    with devices.deterministic(), contextlib.ExitStack() as locks:
        seed_everything(cfg.seed)
        info, train_set, test_set, val_set = distributed.in_turn(
            ctx, lambda: _datasets(cfg, download)
        )
        model = _prepare_model(cfg, _model(cfg, info, test_set[0][0]), device, ctx)
        amp = devices.amp_dtype(device) if cfg.amp else None
        compile_mode = cfg.compile_mode if cfg.compile else None
        trainer = Trainer(
            model,
            _optimizer(cfg, model),
            device=device,
            amp_dtype=amp,
            compile=compile_mode,
            callbacks=callbacks,
            progress=view,
            reduce=distributed.reducer(device) if ctx.enabled else None,
            channels_last=cfg.channels_last,
            top5=info.num_classes > TOP5_ABOVE,
            label_smoothing=cfg.label_smoothing,
            clip_grad_norm=cfg.clip_grad_norm,
        )
        if plan == "resume" and not (out / "checkpoint.pt").is_file():
            metrics = out / "metrics.jsonl"
            if metrics.is_file() and metrics.read_text(encoding="utf-8").strip():
                raise RunError(
                    f"{out} has trained epochs in metrics.jsonl but no checkpoint.pt to resume "
                    "from; start again with --overwrite"
                )
        elif plan == "resume":
            state = checkpoint.load(out / "checkpoint.pt", cfg.to_dict())
            try:
                trainer.load_state_dict(state)
            except (RuntimeError, KeyError, ValueError, TypeError) as err:
                reason = " ".join(str(err).split())[:200]
                where = out / "checkpoint.pt"
                raise RunError(f"{where} does not fit this run ({reason})") from None
        if ctx.enabled:
            parallel = distributed.wrap(model, device)
            trainer.forward = (
                parallel if compile_mode is None else torch.compile(parallel, mode=compile_mode)
            )
            trainer.callbacks.append(distributed.BufferSync())
        ctx.barrier()  # every process has read the folder before rank 0 changes it
        tensorboard_writer = None
        if is_main:
            classes = [str(c) for c in test_set.classes]
            locks.enter_context(_folder_lock(out))
            _prepare_folder(out, cfg, encoding, plan, trainer, classes)
            view.log_file = out / "train.log"
            if writer_class is not None:
                tensorboard_writer = writer_class(str(out / "tensorboard"))
            trainer.callbacks.append(RunWriter(out, cfg, view, tensorboard_writer, classes))
        start = f"resuming after epoch {trainer.epoch}" if trainer.epoch else "new run"
        where = devices.describe(device)
        if ctx.enabled:
            where += f" x {ctx.world_size} processes ({ctx.backend})"
        held = "" if val_set is None else f", {len(val_set):,} validation"
        view.write(
            f"{cfg.model} {cfg.variant} on {cfg.dataset} (encoding {cfg.encoding}): "
            f"{len(train_set):,} training{held}, {len(test_set):,} test images, "
            f"{models.count_parameters(model):,} parameters, {where}, {start} -> {out}"
        )
        train_loader, test_loader, val_loader = _loaders(
            cfg, info, train_set, test_set, val_set, device, ctx
        )
        try:
            with _sigterm_as_interrupt():
                trainer.fit(
                    train_loader,
                    test_loader,
                    cfg.epochs,
                    val_loader=val_loader,
                    max_steps=cfg.max_steps,
                    lr_at=lr_schedule(cfg.schedule, cfg.lr, cfg.epochs),
                    warmup_steps=math.ceil(cfg.warmup * len(train_loader)),
                )
        except KeyboardInterrupt:
            saved = _saved_epoch(trainer)
            where = (
                f"in epoch {trainer.epoch}; {out / 'checkpoint.pt'} holds epoch {saved}"
                if trainer.epoch > saved
                else f"after epoch {saved}, which {out / 'checkpoint.pt'} holds"
            )
            command = resume_command or f"quatnn train --resume {out}"
            message = f"interrupted {where}; resume with: {command}"
            view.log(message)  # the caller prints it
            raise Interrupted(message) from None
        except NonFiniteLoss as err:
            message = (
                f"{err}; training stopped and {out / 'checkpoint.pt'} keeps epoch "
                f"{_saved_epoch(trainer)} (a lower --lr may help)"
            )
            view.log(message)
            raise NonFiniteLoss(message) from None
        finally:
            if tensorboard_writer is not None:
                tensorboard_writer.close()
        summary = _summary(cfg, trainer, device, ctx.world_size)
        if is_main:
            text = json.dumps(summary, indent=2) + "\n"
            checkpoint.write_atomic(out / "summary.json", lambda f: f.write(text), mode="w")
        ctx.barrier()  # the folder is complete before any process moves on
        chosen = f"val acc {summary['best_val_acc']:.2%}, " if "best_val_acc" in summary else ""
        view.write(
            f"finished {out}: test acc {summary['final_test_acc']:.2%} (best epoch "
            f"{summary['best_epoch']}: {chosen}test acc {summary['best_test_acc']:.2%}), "
            f"{summary['total_seconds']:.1f} s, {summary['samples_per_second']:.0f} samples/s"
        )
        return summary


def _saved_epoch(trainer: Trainer) -> int:
    """The epoch ``checkpoint.pt`` holds: the last one whose end completed the write."""
    writer = next((c for c in trainer.callbacks if isinstance(c, RunWriter)), None)
    return len(trainer.history) if writer is None else writer.saved_epoch


def _compare_identity(cfg: TrainConfig) -> dict:
    return {k: v for k, v in cfg.identity().items() if k not in ("variant", "seed")}


def compare(
    base: TrainConfig,
    out: str | Path,
    *,
    variants: Sequence[str] = (),
    seeds: Sequence[int] = DEFAULT_SEEDS,
    overwrite: bool = False,
    progress: str = "auto",
    tensorboard: bool = False,
    download: bool = True,
    callbacks: Sequence[Callback] = (),
    jobs: int = 1,
) -> list[Path]:
    """Train ``base`` for every variant and seed into ``out/<variant>-s<seed>`` and return
    those folders. Finished runs are skipped and unfinished ones resumed, so running the
    same comparison again continues it. ``variants`` defaults to
    :func:`default_variants` of the dataset. Every run is checked before any trains.

    ``jobs`` > 1 trains that many runs at a time, each in a process of its own with its own
    GPU where there are several (:func:`quatnn.train.distributed.run_jobs`; ``callbacks``
    must then pickle). Under torchrun every run uses all processes, one run after another.
    """
    out = Path(out)
    ctx = distributed.current()
    variants = tuple(variants) or default_variants(base.dataset)
    if not seeds or len(set(seeds)) != len(seeds) or len(set(variants)) != len(variants):
        raise RunError("compare needs at least one seed, and no variant or seed twice")
    _check_jobs(jobs, ctx)
    # The runs as asked (an auto encoding stays auto in their config.toml, as in quatnn
    # train), each checked (resolved) before any trains.
    runs = [
        (out / f"{v}-s{s}", dataclasses.replace(base, variant=v, seed=s))
        for v in variants
        for s in seeds
    ]
    resolved = [resolve(cfg) for _, cfg in runs]
    saved = _saved_config(out, marker="compare.toml")
    if saved is not None and not overwrite:
        differences = _differences(_compare_identity(saved), _compare_identity(base))
        if differences:
            raise RunError(
                f"{out} holds a different comparison ({differences}); use "
                "--overwrite to replace it, or another --out, or continue that one with: "
                f"quatnn compare --config {out / 'compare.toml'} --out {out}"
            )
        for (path, _), cfg in zip(runs, resolved, strict=True):
            _plan(path, cfg, "continue")
    if saved is None or overwrite or jobs > 1:  # the data, before the folder (and the jobs)
        distributed.in_turn(ctx, lambda: _datasets(resolved[0], download))
    ctx.barrier()  # every process has checked the folder before rank 0 changes it
    if ctx.is_main:
        if saved is not None and overwrite:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        recipe = {k: v for k, v in base.to_dict().items() if k not in ("variant", "seed")}
        had = load_toml(out / "compare.toml") if saved is not None and not overwrite else {}
        recipe |= continued_runs(had, variants, seeds)
        (out / "compare.toml").write_text(dumps_toml(recipe), encoding="utf-8")
    ctx.barrier()
    options = {"progress": progress, "tensorboard": tensorboard, "download": download}
    if jobs > 1:
        _compare_jobs(runs, resolved, jobs, {**options, "callbacks": list(callbacks)})
        return [path for path, _ in runs]
    for i, (path, cfg) in enumerate(runs, 1):
        if ctx.is_main:
            print(f"[{i}/{len(runs)}] {cfg.variant} seed {cfg.seed} -> {path}", flush=True)
        try:
            train(cfg, path, if_exists="continue", callbacks=callbacks, **options)
        except Interrupted:
            raise Interrupted(
                f"interrupted while training {path}; its last epoch and the finished runs "
                "are kept: run the same quatnn compare command again to continue"
            ) from None
    return [path for path, _ in runs]


def _check_jobs(jobs: int, ctx: distributed.Context) -> None:
    if jobs < 1:
        raise RunError(f"jobs must be at least 1, got {jobs}")
    if jobs > 1 and ctx.enabled:
        raise RunError(
            "--jobs N trains runs in separate processes; under torchrun each run already "
            "uses every process: use --jobs 1"
        )


def uses_gpu(cfg: TrainConfig) -> bool:
    """Whether a job of ``cfg`` should be given a GPU of its own (its device is chosen
    automatically or is plain ``cuda``)."""
    return cfg.device in ("auto", "cuda")


def _compare_jobs(
    runs: list[tuple[Path, TrainConfig]], resolved: list[TrainConfig], jobs: int, options: dict
) -> None:
    """Train ``runs`` (folder, config as asked; ``resolved``: those configs resolved) in
    ``jobs`` processes at a time."""
    todo = []
    for i, ((path, cfg), checked) in enumerate(zip(runs, resolved, strict=True), 1):
        if _plan(path, checked, "continue") == "finished":
            print(f"[{i}/{len(runs)}] {path} already holds this run, finished", flush=True)
        else:
            todo.append((i, path, cfg))
    if not todo:
        return
    tasks = [
        distributed.Job(
            f"{cfg.variant} seed {cfg.seed}",
            train,
            (cfg, path),
            {**options, "if_exists": "continue", "progress": "off"},
            gpu=uses_gpu(cfg),
        )
        for _, path, cfg in todo
    ]

    def started(k: int, job: distributed.Job) -> None:
        i, path, _ = todo[k]
        print(f"[{i}/{len(runs)}] {job.name} -> {path} (started)", flush=True)

    def ended(k: int, job: distributed.Job, summary: dict) -> None:
        i, path, _ = todo[k]
        acc = summary["final_test_acc"]
        print(f"[{i}/{len(runs)}] {job.name} finished: test acc {acc:.2%}", flush=True)

    try:
        distributed.run_jobs(tasks, jobs, on_start=started, on_end=ended)
    except Interrupted:
        raise Interrupted(
            "interrupted; the finished runs and the last epoch of the others are kept: run "
            "the same quatnn compare command again to continue"
        ) from None
