"""The training loop: epochs of optimizer steps and evaluations, with hooks around them.

:class:`Trainer` knows nothing of run folders: whatever should happen after a step or an
epoch (masks for pruning, writing metrics and checkpoints) is a :class:`Callback`.
Losses and accuracies are summed on the device and read back every ``sync_every`` steps,
so a GPU is not stalled after every step; a non-finite loss is still reported with the
exact step where it first appeared, as are NaN/Inf activations that reach a quaternion
batch norm (:class:`~quatnn.nn.norm.NonFiniteStatistics`) and NaN/Inf weights at the end
of an epoch (before it is evaluated and saved): all raise
:class:`~quatnn.train.errors.NonFiniteLoss`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> _ = torch.manual_seed(0)
    >>> loader = DataLoader(TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,))), 16)
    >>> model = nn.Linear(8, 2)
    >>> trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    >>> trainer.fit(loader, loader, epochs=2)
    >>> [row["epoch"] for row in trainer.history], trainer.step
    ([1, 2], 8)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from quatnn.nn.norm import NonFiniteStatistics
from quatnn.train.errors import NonFiniteLoss
from quatnn.train.progress import Progress
from quatnn.train.seeding import rng_state, set_rng_state

TIMING_KEYS = ("epoch_seconds", "eval_seconds", "samples_per_second")
"""Keys of a metrics row that measure time and so differ between identical runs."""


def top5_hits(logits: Tensor, labels: Tensor) -> Tensor:
    """How many ``labels`` are among the five highest ``logits`` of their row (a float
    tensor on the logits' device, so that counting waits for nothing).

    >>> top5_hits(torch.tensor([[6.0, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6]]), torch.tensor([5, 5]))
    tensor(1.)
    """
    return (logits.topk(5).indices == labels[:, None]).any(1).sum().float()


class Callback:
    """Hooks called by :meth:`Trainer.fit`; subclass and override what you need.

    A hook may raise KeyboardInterrupt to stop training as Ctrl-C would.
    """

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first epoch of every :meth:`Trainer.fit` call (also after a resume)."""

    def on_step_end(self, trainer: Trainer) -> None:
        """After each optimizer step: ``trainer.step`` counts the steps of the whole run and
        ``trainer.loss`` is this step's loss tensor (reading it syncs the device)."""

    def on_evaluate(self, trainer: Trainer) -> None:
        """Before each epoch's evaluation, after its last optimizer step."""

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        """After each epoch's evaluation; ``row`` was just appended to ``trainer.history``."""


def lr_schedule(name: str, lr: float, epochs: int) -> Callable[[int], float]:
    """The learning rate of each epoch (counted from 1): ``none`` keeps ``lr``, ``cosine``
    anneals from ``lr`` towards 0, ``step`` multiplies by 0.1 for the epochs that start
    once 50% and again once 75% of the epochs are done. A pure function of the epoch, so a
    resumed run needs no scheduler state.

    >>> [round(lr_schedule("step", 1.0, 4)(e), 3) for e in (1, 2, 3, 4)]
    [1.0, 1.0, 0.1, 0.01]
    >>> [round(lr_schedule("step", 1.0, 6)(e), 3) for e in range(1, 7)]
    [1.0, 1.0, 1.0, 0.1, 0.1, 0.01]
    """
    if name == "cosine":
        return lambda epoch: lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))
    if name == "step":

        def step(epoch: int) -> float:
            done = epoch - 1  # epochs done before this one: cuts at done/E >= 1/2 and 3/4
            return lr * 0.1 ** ((2 * done >= epochs) + (4 * done >= 3 * epochs))

        return step
    if name == "none":
        return lambda epoch: lr
    raise ValueError(f"unknown schedule {name!r}")


class Trainer:
    """Trains ``model`` with ``optimizer`` on classification batches ``(x, labels)``.

    Args:
        model: the module whose state is trained and saved (already on ``device``).
        optimizer: an optimizer over ``model``'s parameters.
        device: where batches are moved (non-blocking).
        amp_dtype: autocast dtype, or None for full precision; float16 adds loss scaling.
        compile: run the forward pass through ``torch.compile`` in this mode (one of
            :data:`~quatnn.train.config.COMPILE_MODES`); None: eager.
        callbacks: :class:`Callback` hooks, called in order.
        progress: bars and log lines (default: none).
        reduce: sums a CPU float64 tensor of per-process values (loss sums, correct and
            sample counts, seconds) over processes, for distributed training; by default
            unchanged. Called at the same points in every process.
        sync_every: steps between reads of the running loss (and non-finite checks).
        channels_last: move 4D input batches to the device in channels-last layout.
        top5: evaluation also gives the top-5 accuracy (``<split>_top5``).
        label_smoothing: of the training loss (``F.cross_entropy``'s); evaluation losses
            are plain cross-entropy.
        clip_grad_norm: if positive, scale the gradients down to this total 2-norm when
            it is larger, before each optimizer step.

    ``forward`` (the model, or its ``torch.compile`` wrapper) runs the training forward
    pass; a distributed wrapper such as DistributedDataParallel can replace it.
    ``eval_forward`` (by default the same) runs the evaluation.

    A batch sampler with ``loss_weight(batch)`` (a process's share of global batches, see
    :class:`quatnn.train.distributed.ShardedBatchSampler`) makes each step's loss the sum
    of the per-sample losses times that weight instead of their mean.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        device: torch.device | str = "cpu",
        amp_dtype: torch.dtype | None = None,
        compile: str | None = None,
        callbacks: Sequence[Callback] = (),
        progress: Progress | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
        sync_every: int = 25,
        channels_last: bool = False,
        top5: bool = False,
        label_smoothing: float = 0.0,
        clip_grad_norm: float = 0.0,
    ) -> None:
        self.model, self.optimizer, self.device = model, optimizer, torch.device(device)
        self.forward = model if compile is None else torch.compile(model, mode=compile)
        self.eval_forward = self.forward
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler(self.device.type) if amp_dtype == torch.float16 else None
        self.callbacks = list(callbacks)
        self.progress = progress or Progress()
        self.reduce = reduce or (lambda totals: totals)
        self.sync_every = sync_every
        self.channels_last = channels_last
        self.top5 = top5
        self.label_smoothing = label_smoothing
        self.clip_grad_norm = clip_grad_norm
        self.epoch = 0
        self.step = 0
        self.history: list[dict] = []
        self.loss: Tensor | None = None
        self._lr_at: Callable[[int], float] | None = None
        self._warmup_steps = 0

    def _to_device(self, x: Tensor) -> Tensor:
        if self.channels_last and x.dim() == 4:
            return x.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return x.to(self.device, non_blocking=True)

    def _autocast(self) -> torch.autocast:
        dtype = self.amp_dtype or torch.float32
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.amp_dtype is not None)

    def fit(
        self,
        train_loader: DataLoader,
        test_loader: DataLoader,
        epochs: int,
        *,
        val_loader: DataLoader | None = None,
        max_steps: int = 0,
        lr_at: Callable[[int], float] | None = None,
        warmup_steps: int = 0,
    ) -> None:
        """Train from epoch ``self.epoch + 1`` to ``epochs`` (or until ``max_steps``
        optimizer steps in all, if not 0), evaluating on ``test_loader`` (and
        ``val_loader``, if given: ``val_loss`` and ``val_acc``) after each epoch.
        ``lr_at(epoch)`` sets the learning rate of each epoch; the first ``warmup_steps``
        optimizer steps of the run scale it by ``step / warmup_steps`` (step counted from
        1: a linear warmup, Goyal et al. 2017). A sampler or batch sampler with
        ``set_epoch`` is told the epoch before it is iterated."""
        if warmup_steps and lr_at is None:
            raise ValueError("warmup_steps needs lr_at, the learning rate it warms up to")
        self._lr_at, self._warmup_steps = lr_at, warmup_steps
        for callback in self.callbacks:
            callback.on_train_start(self)
        self.progress.start_epochs(epochs, self.epoch)
        try:
            while self.epoch < epochs and not (max_steps and self.step >= max_steps):
                self.epoch += 1
                self._set_lr()
                lr = self.optimizer.param_groups[0]["lr"]
                for sampler in (train_loader.sampler, train_loader.batch_sampler):
                    if hasattr(sampler, "set_epoch"):
                        sampler.set_epoch(self.epoch)
                train = self.train_epoch(train_loader, max_steps)
                self._check_weights()
                for callback in self.callbacks:
                    callback.on_evaluate(self)
                scores = self.evaluate(test_loader)
                if val_loader is not None:
                    val = self.evaluate(val_loader, "val")
                    scores["eval_seconds"] += val.pop("eval_seconds")
                    scores |= val
                row = {"epoch": self.epoch, "step": self.step, "lr": lr, **train, **scores}
                self.history.append(row)
                shown = [k for k in ("val_acc", "test_acc") if k in row]
                self.progress.end_epoch(**{k: f"{row[k]:.2%}" for k in shown})
                for callback in self.callbacks:
                    callback.on_epoch_end(self, row)
        finally:
            self.progress.close()

    def _set_lr(self) -> None:
        """The learning rate of the next step: ``lr_at(epoch)``, warmed up."""
        if self._lr_at is None:
            return
        lr = self._lr_at(self.epoch)
        if self.step < self._warmup_steps:
            lr *= (self.step + 1) / self._warmup_steps
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train_epoch(self, loader: DataLoader, max_steps: int = 0) -> dict:
        """One pass over ``loader`` (fewer batches if ``max_steps`` is reached):
        ``train_loss``, ``train_acc``, ``epoch_seconds`` and ``samples_per_second``."""
        self.model.train()
        total = len(loader) if not max_steps else min(len(loader), max_steps - self.step)
        self.progress.start_batches(total, self.epoch)
        share = getattr(loader.batch_sampler, "loss_weight", None)
        sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, samples (all processes)
        window, sizes = [], []
        start = time.perf_counter()
        for batch, (x, y) in enumerate(loader, 1):
            x = self._to_device(x)
            y = y.to(self.device, non_blocking=True)
            try:
                with self._autocast():
                    logits = self.forward(x)
            except NonFiniteStatistics as err:  # NaN/Inf activations meet a batch norm
                if window:  # a non-finite loss before it is the first sign: name that step
                    self._flush(window, sizes, batch - 1, total)
                raise NonFiniteLoss(
                    f"activations became non-finite in epoch {self.epoch} at step "
                    f"{self.step + 1} (batch {batch} of {total}): {err}"
                ) from None
            if share is None:
                loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
                loss_sum = loss.detach() * len(y)
            else:  # this process's share of the global batch mean
                loss_sum = F.cross_entropy(
                    logits.float(), y, reduction="sum", label_smoothing=self.label_smoothing
                )
                loss = loss_sum * share(batch - 1)
                loss_sum = loss_sum.detach()
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is None:
                loss.backward()
                self._clip()
                self.optimizer.step()
            else:
                self.scaler.scale(loss).backward()
                self._clip()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            self.step += 1
            self.loss = loss
            if self.step <= self._warmup_steps:
                self._set_lr()
            correct = (logits.argmax(1) == y).sum().float()
            window.append(torch.stack((loss_sum, correct)))
            sizes.append(len(y))
            for callback in self.callbacks:
                callback.on_step_end(self)
            if len(window) == self.sync_every or batch == total:
                sums += self._flush(window, sizes, batch, total)
                self.progress.update_batches(
                    len(window),
                    loss=f"{sums[0] / sums[2]:.4f}",
                    acc=f"{sums[1] / sums[2]:.2%}",
                    samples_s=f"{sums[2] / (time.perf_counter() - start):.0f}",
                )
                window.clear()
                sizes.clear()
            if batch == total:
                break
        seconds, processes = self.reduce(
            torch.tensor([time.perf_counter() - start, 1.0], dtype=torch.float64)
        ).tolist()
        loss_sum, correct, samples = sums.tolist()
        seconds /= processes  # the mean over processes
        return {
            "train_loss": loss_sum / samples,
            "train_acc": correct / samples,
            "epoch_seconds": seconds,
            "samples_per_second": samples / seconds,
        }

    def _clip(self) -> None:
        if self.clip_grad_norm > 0:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # clip the gradients, not scaled ones
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm)

    def _check_weights(self) -> None:
        """Raise NonFiniteLoss if a weight is NaN or infinite after the epoch's last step
        (its loss was finite), before the epoch is evaluated and saved."""
        params = [p.detach() for p in self.model.parameters()]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise NonFiniteLoss(
                f"weights became non-finite in epoch {self.epoch} at step {self.step} (the "
                "epoch's last)"
            )

    def _flush(self, window: list[Tensor], sizes: list[int], batch: int, total: int) -> Tensor:
        """Sum the window's (loss * n, correct, n) rows on the CPU (one device sync) and
        over processes; raise NonFiniteLoss naming the first step whose loss is NaN or
        infinite (in any process, so that all of them stop there)."""
        values = torch.stack(window).cpu().double()
        values = torch.cat((values, torch.tensor(sizes, dtype=torch.float64)[:, None]), 1)
        values = self.reduce(values)
        bad = torch.nonzero(~torch.isfinite(values[:, 0])).flatten()
        if len(bad):
            back = len(values) - int(bad[0]) - 1
            value = float(values[int(bad[0]), 0])
            raise NonFiniteLoss(
                f"training loss became {value} in epoch {self.epoch} at step "
                f"{self.step - back} (batch {batch - back} of {total})"
            )
        return values.sum(0)

    @torch.no_grad()
    def evaluate(self, loader: DataLoader, split: str = "test") -> dict:
        """Mean loss and accuracy over ``loader`` in eval mode: ``<split>_loss``,
        ``<split>_acc`` (and ``<split>_top5`` with ``top5``) and ``eval_seconds`` (with a
        ``reduce`` hook: over the loaders of all processes, and the mean seconds)."""
        self.model.eval()
        start = time.perf_counter()
        rows = []
        samples = 0
        for x, y in loader:
            x = self._to_device(x)
            y = y.to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.eval_forward(x)
            loss_sum = F.cross_entropy(logits.float(), y, reduction="sum")
            scores = [loss_sum, (logits.argmax(1) == y).sum().float()]
            if self.top5:
                scores.append(top5_hits(logits, y))
            rows.append(torch.stack(scores))
            samples += len(y)
        # (a process's part of a test set may be empty)
        width = 2 + self.top5
        sums = torch.stack(rows).cpu().double().sum(0) if rows else torch.zeros(width).double()
        seconds = time.perf_counter() - start
        totals = torch.cat((sums, torch.tensor([samples, seconds, 1.0], dtype=torch.float64)))
        *scores, samples, seconds, processes = self.reduce(totals).tolist()
        names = ("loss", "acc", "top5")[:width]
        return {
            **{f"{split}_{name}": v / samples for name, v in zip(names, scores, strict=True)},
            "eval_seconds": seconds / processes,
        }

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: model, optimizer, loss scaler, global RNG
        states, epoch, step and the metrics history."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "history": [dict(row) for row in self.history],
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history = [dict(row) for row in state["history"]]
