"""Scale out: data-parallel training on torch.distributed, and sweeps in parallel processes.

Data parallel (torchrun)
------------------------
Launched by ``torchrun`` (which sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``),
``quatnn train``, ``compare`` and ``lottery`` train each run with
:class:`~torch.nn.parallel.DistributedDataParallel` over all processes::

    torchrun --nproc_per_node 4 -m quatnn train --model resnet18 --dataset cifar10 ...

* :func:`session` starts the process group (backend ``auto``: NCCL on CUDA, else gloo;
  ``--backend`` overrides) and destroys it on exit, also after an error or Ctrl-C. Each
  process trains on ``cuda:LOCAL_RANK`` when it trains on CUDA.
* One global batch: ``--batch-size`` stays the batch of one optimizer step, and must be
  divisible by the number of processes. Every process draws the same ``(seed, epoch)``
  shuffle and takes its contiguous share of each global batch
  (:class:`ShardedBatchSampler`); per-sample augmentation is seeded from
  ``(seed, epoch, index)`` as in one process. Each process's loss is its share of the
  global batch mean (the sum of its per-sample losses times ``world_size / global
  batch``), so the gradient DDP averages equals the single-process gradient, also for a
  smaller last batch split unevenly. Weights, metrics and checkpoints match a
  single-process run up to floating-point rounding (random ops inside the model, such as
  dropout, draw the same numbers on every process; no zoo model has any). A last batch
  smaller than the number of processes is dropped.
* Metrics: loss sums, correct counts and sample counts are summed over processes (every
  ``sync_every`` steps, which also makes every process stop at the same step when the
  loss becomes NaN); timings are averaged.
* Evaluation is sharded: each process evaluates a contiguous part of the test set
  (:class:`ShardSampler`), with the model itself rather than the DDP wrapper, after its
  floating-point buffers (batch-norm running statistics) are broadcast from rank 0; the
  sums are reduced.
* Files: only rank 0 writes the run folder (config, metrics, checkpoints, log, summary,
  TensorBoard, lottery masks) and shows progress; the others print only errors. Barriers
  keep the others from reading a folder while rank 0 rewrites it. The run folder must be
  on a file system every node sees (for resume and lottery levels).
* Checkpoints hold the plain model (no ``module.`` prefix), the optimizer, the loss scaler
  and the RNG states, which are the same on every process: nothing depends on the number
  of processes, so a run can be resumed with any number of them, or with one.
* ``--sync-bn`` converts batch norms with :func:`quatnn.nn.sync_norm.convert_sync_batchnorm`:
  quaternion ones to :class:`~quatnn.nn.sync_norm.QSyncBatchNorm`, real ones to
  :class:`torch.nn.SyncBatchNorm` (CUDA only). Then batch statistics cover the global
  batch, as in one process.
* Ctrl-C and SIGTERM: torchrun passes them to every process; each stops, the group is
  destroyed, and ``checkpoint.pt`` keeps the last completed epoch. A failing process makes
  torchrun stop the others.

Launching on several nodes: one torchrun per node, the same command everywhere (the
c10d rendezvous numbers the nodes; ``--node_rank N`` fixes the order)::

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_id r18 --rdzv_backend c10d \\
        --rdzv_endpoint node0.cluster:29500 -m quatnn train ... --out /shared/runs/r18

and under SLURM, one task per node: ``srun torchrun --nnodes $SLURM_NNODES
--nproc_per_node 4 --rdzv_id $SLURM_JOB_ID --rdzv_backend c10d --rdzv_endpoint
$HEAD:29500 -m quatnn train ...`` with ``HEAD`` the first host of
``scontrol show hostnames $SLURM_JOB_NODELIST``.

Sweeps (``--jobs N``)
---------------------
:func:`run_jobs` runs independent trainings (``compare`` runs, ``lottery`` chains) in
``N`` separate processes at a time. When GPUs are visible each process sees one of them
(``CUDA_VISIBLE_DEVICES``, round-robin over the job slots); on CPU the torch threads are
split between the processes. Results land in the same folders as with ``--jobs 1``.

Example:
    >>> ctx = current()  # no process group: a single process
    >>> ctx.world_size, ctx.is_main, ctx.enabled
    (1, True, False)
    >>> sampler = ShardedBatchSampler(range(10), batch_size=4, rank=1, world_size=2)
    >>> list(sampler), [sampler.loss_weight(i) for i in range(3)]
    ([[2, 3], [6, 7], [9]], [0.5, 0.5, 1.0])
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Sampler

from quatnn.train import device as devices
from quatnn.train.errors import Interrupted, NonFiniteLoss, RunError
from quatnn.train.loop import Callback, Trainer

__all__ = [
    "BufferSync",
    "Context",
    "Job",
    "ShardSampler",
    "ShardedBatchSampler",
    "choose_backend",
    "current",
    "env_rank",
    "in_turn",
    "process_device",
    "reducer",
    "run_jobs",
    "session",
    "wrap",
]

_GRACE_SECONDS = 3.0
ENV_KEYS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun sets besides ``WORLD_SIZE``; all are needed to join a process group."""


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise RunError(
            f"environment variable {name}={os.environ[name]!r} is not an integer"
        ) from None


def env_rank() -> int:
    """This process's rank as the launcher set it (``RANK``; 0 if unset or not a number)."""
    try:
        return _env_int("RANK", 0)
    except RunError:
        return 0


@dataclass(frozen=True)
class Context:
    """Where this process stands in a data-parallel run: ``rank`` of ``world_size``, and
    ``local_rank`` of ``local_world_size`` on its node. The default is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """More than one process trains together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process (nothing to do in a single process)."""
        if self.enabled:
            dist.barrier()


def current() -> Context:
    """The context of this process: from the default process group if one is initialized,
    else a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    return Context(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=_env_int("LOCAL_RANK", 0),
        local_world_size=_env_int("LOCAL_WORLD_SIZE", 1),
        backend=str(dist.get_backend()),
    )


def process_device(name: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The device of ``--device NAME`` for this process: with several processes, CUDA
    means ``cuda:LOCAL_RANK`` (modulo the visible devices), whatever index was asked."""
    device = devices.resolve(name)
    if device.type == "cuda" and world_size > 1:
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def choose_backend(name: str, device: torch.device) -> str:
    """``auto``: NCCL for CUDA devices (where available), else gloo; any other name is
    checked to be available."""
    if name == "auto":
        return "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"
    if name == "nccl" and device.type != "cuda":
        raise RunError(f"backend nccl needs CUDA devices (--device cuda); on {device} use gloo")
    available = getattr(dist, "is_backend_available", None)
    if available is not None and "," not in name and ":" not in name and not available(name):
        raise RunError(f"backend {name!r} is not available in this torch build; try auto or gloo")
    return name


@contextlib.contextmanager
def session(backend: str = "auto", device: str = "auto") -> Iterator[Context]:
    """Join the process group when launched by torchrun with more than one process
    (``WORLD_SIZE`` > 1), and leave it on exit, also after an error or Ctrl-C; yields
    :func:`current`. A group that is already initialized is used and left alone.

    ``device`` is the ``--device`` setting: it picks the automatic backend and, on CUDA,
    makes ``cuda:LOCAL_RANK`` this process's current device.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1 or not dist.is_available() or dist.is_initialized():
        yield current()
        return
    missing = [name for name in ENV_KEYS if name not in os.environ]
    if missing:
        raise RunError(
            f"WORLD_SIZE={world_size} is set but {', '.join(missing)} are not; launch "
            "data-parallel training with torchrun"
        )
    local_rank = _env_int("LOCAL_RANK", 0)
    here = process_device(device, local_rank, world_size)
    name = choose_backend(backend, here)
    if here.type == "cuda":
        torch.cuda.set_device(here)
    options = {"device_id": here} if name == "nccl" else {}
    try:
        dist.init_process_group(backend=name, **options)
    except (RuntimeError, ValueError) as err:
        reason = " ".join(str(err).split())[:300]
        raise RunError(f"cannot join the process group (backend {name}): {reason}") from None
    try:
        yield current()
    finally:
        with contextlib.suppress(Exception):  # a broken group (a peer died) cannot clean up
            dist.destroy_process_group()
        # A gloo worker thread drops a finished collective's tensors after the caller has
        # moved on, and needs the GIL for that. The group's threads outlive this (DDP keeps
        # the group referenced), and one still waiting for the GIL at interpreter shutdown
        # aborts the process ("terminate called without an active exception": about 1 in
        # 10 two-process compares, seen in a core dump). A moment without the GIL lets
        # them finish first.
        time.sleep(0.05)


def reducer(device: torch.device) -> Callable[[Tensor], Tensor]:
    """A :class:`~quatnn.train.loop.Trainer` ``reduce`` hook: sums a CPU tensor over all
    processes (on ``device`` for NCCL, which reduces device tensors only)."""
    where = device if current().backend == "nccl" else torch.device("cpu")

    def reduce(totals: Tensor) -> Tensor:
        summed = totals.to(where)
        dist.all_reduce(summed)
        return summed.cpu()

    return reduce


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in :class:`~torch.nn.parallel.DistributedDataParallel` (gradients
    averaged over processes; parameters and buffers broadcast from rank 0 first)."""
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def in_turn(ctx: Context, fn: Callable[[], object]) -> object:
    """``fn()`` in every process, rank 0 first, then the first process of each other node,
    then the rest: a download runs once per file system, never twice at the same time.
    When ``fn`` fails in one process, it raises there and the others raise RunError."""
    if not ctx.enabled:
        return fn()
    turns = (ctx.rank == 0, ctx.rank != 0 and ctx.local_rank == 0, ctx.local_rank != 0)
    result = None
    for mine in turns:
        error = None
        if mine:
            try:
                result = fn()
            except Exception as err:  # noqa: BLE001 - raised below, after telling the others
                error = err
        said: list = [None] * ctx.world_size
        dist.all_gather_object(said, None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = next(((rank, text) for rank, text in enumerate(said) if text), None)
        if failed is not None:
            raise RunError(f"rank {failed[0]} failed: {failed[1]}")
    return result


class ShardedBatchSampler(Sampler):
    """This process's share of every global batch of ``sampler``.

    The keys of ``sampler`` are cut into global batches of ``batch_size`` (the last may be
    smaller), exactly as a single process batches them, and process ``rank`` takes the
    contiguous ``rank``-th of ``world_size`` near-equal parts of each. A last batch with
    fewer keys than processes is dropped. ``set_epoch`` is passed on to ``sampler``.
    """

    def __init__(self, sampler: Iterable, batch_size: int, rank: int, world_size: int) -> None:
        if batch_size % world_size:
            raise ValueError(
                f"batch size {batch_size} is not divisible by the {world_size} processes"
            )
        self.sampler, self.batch_size = sampler, batch_size
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        full, rest = divmod(len(self.sampler), self.batch_size)
        return full + (rest >= self.world_size)

    def _share(self, batch: list) -> list:
        size = len(batch)
        return batch[
            self.rank * size // self.world_size : (self.rank + 1) * size // self.world_size
        ]

    def __iter__(self) -> Iterator[list]:
        batch: list = []
        for key in self.sampler:
            batch.append(key)
            if len(batch) == self.batch_size:
                yield self._share(batch)
                batch = []
        if len(batch) >= self.world_size:
            yield self._share(batch)

    def loss_weight(self, index: int) -> float:
        """``world_size / global batch size`` of batch ``index`` (from 0) of the epoch: the
        factor that turns the sum of this process's per-sample losses into its share of the
        global mean, so that the average over processes is that mean."""
        size = min(self.batch_size, len(self.sampler) - index * self.batch_size)
        return self.world_size / size


class ShardSampler(Sampler):
    """The contiguous ``rank``-th of ``world_size`` near-equal parts of ``range(length)``,
    in order (for sharded evaluation; the parts may differ in size by one)."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.start = rank * length // world_size
        self.stop = (rank + 1) * length // world_size

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))


class BufferSync(Callback):
    """Before each evaluation, broadcast the model's floating-point buffers (batch-norm
    running statistics) from rank 0, so that every process evaluates the model that rank 0
    checkpoints (without ``--sync-bn`` each process's last step updates them with its own
    share of the batch)."""

    def on_evaluate(self, trainer: Trainer) -> None:
        for buf in trainer.model.buffers():
            if buf.is_floating_point():
                dist.broadcast(buf, 0)


# ---------------------------------------------------------------------------------------
# sweeps: independent runs in parallel processes
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One independent training for :func:`run_jobs`: ``fn(*args, **kwargs)`` in its own
    process (``fn`` and its arguments must pickle). ``gpu``: give it one visible GPU."""

    name: str
    fn: Callable[..., object]
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    gpu: bool = True


def visible_gpus() -> list[str]:
    """The CUDA devices this process may hand out, as ``CUDA_VISIBLE_DEVICES`` entries."""
    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [d.strip() for d in given.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]


def _job_main(job: Job, env: dict, threads: int, conn: object) -> None:
    """The body of a job process: run the job and send ``(ok, value)`` back."""
    os.environ.update(env)
    torch.set_num_threads(threads)
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the run folder keeps the log lines
    try:
        outcome = (True, job.fn(*job.args, **job.kwargs))
    except (RunError, NonFiniteLoss, Interrupted) as err:
        outcome = (False, err)
    except KeyboardInterrupt:
        outcome = (False, Interrupted(f"{job.name}: interrupted"))
    except BaseException as err:  # noqa: BLE001 - reported to the parent, not swallowed
        traceback.print_exc()
        outcome = (False, RunError(f"{job.name} failed: {type(err).__name__}: {err}"))
    try:
        conn.send(outcome)
    except OSError:  # the parent has gone (a second Ctrl-C): nobody is left to tell
        pass
    except Exception as err:  # noqa: BLE001 - an unpicklable result or error
        with contextlib.suppress(OSError):
            conn.send((False, RunError(f"{job.name}: cannot send its result back: {err}")))
    conn.close()


def _interrupt_as_exception(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_jobs(
    jobs: Sequence[Job],
    processes: int,
    *,
    on_start: Callable[[int, Job], None] | None = None,
    on_end: Callable[[int, Job, object], None] | None = None,
) -> list:
    """Run ``jobs`` in up to ``processes`` fresh (spawned) processes at a time and return
    their results in order. Each process sees one GPU when GPUs are visible (round-robin
    over the process slots, for jobs with ``gpu``) and gets an equal share of the torch
    threads; its stdout is dropped (runs log to their folders), its stderr kept.
    ``on_start(i, job)`` and ``on_end(i, job, result)`` are called in this process.

    When a job fails, the jobs still running are stopped (SIGTERM: they keep their last
    epoch), none are started, and its exception (RunError, NonFiniteLoss, Interrupted) is
    raised. Ctrl-C or SIGTERM stops all jobs and raises Interrupted.
    """
    if processes < 1:
        raise RunError(f"jobs must be at least 1, got {processes}")
    context = multiprocessing.get_context("spawn")
    gpus = visible_gpus()
    threads = split_threads(torch.get_num_threads(), min(processes, max(1, len(jobs))))
    pending = list(enumerate(jobs))
    running: dict[int, tuple[int, object, object]] = {}  # slot -> (index, process, conn)
    results: list = [None] * len(jobs)
    failure: BaseException | None = None
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt_as_exception) if main_thread else None
    try:
        while running or (pending and failure is None):
            while pending and failure is None and len(running) < processes:
                slot = min(set(range(processes)) - set(running))
                index, job = pending.pop(0)
                env = {"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]} if gpus and job.gpu else {}
                receive, send = context.Pipe(duplex=False)
                process = context.Process(
                    target=_job_main, args=(job, env, threads, send), name=f"quatnn-job-{index}"
                )
                if on_start is not None:
                    on_start(index, job)
                with _environment(env):  # inherited before the child imports anything
                    process.start()
                send.close()
                running[slot] = (index, process, receive)
            ready = wait([conn for _, _, conn in running.values()])
            for slot, (index, process, conn) in list(running.items()):
                if conn not in ready:
                    continue
                try:
                    ok, value = conn.recv()
                except EOFError:
                    process.join()
                    code = process.exitcode
                    ok, value = False, RunError(f"{jobs[index].name}: its process died ({code})")
                process.join()
                del running[slot]
                if ok:
                    results[index] = value
                    if on_end is not None:
                        on_end(index, jobs[index], value)
                elif failure is None:
                    failure = value
                    _stop(running)
    except KeyboardInterrupt:
        # Ctrl-C reached the jobs too (one process group); SIGTERM those still running
        # after a grace period (the parent alone was signalled, or they are starting up).
        for _, process, _ in running.values():
            process.join(_GRACE_SECONDS)
        _stop(running)
        for _, process, _ in running.values():
            process.join()
        raise Interrupted(
            "interrupted; finished runs and the last epoch of the others are kept"
        ) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if failure is not None:
        raise failure
    return results


@contextlib.contextmanager
def _environment(values: dict) -> Iterator[None]:
    """``os.environ`` with ``values`` set, restored afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _stop(running: dict) -> None:
    """Ask the running job processes to stop (SIGTERM: a run saves nothing half-done)."""
    for _, process, _ in running.values():
        if process.is_alive():
            process.terminate()


def split_threads(total: int, parts: int) -> int:
    """Torch threads for each of ``parts`` processes sharing ``total`` (at least 1).

    >>> split_threads(16, 3), split_threads(2, 4)
    (5, 1)
    """
    return max(1, math.floor(total / parts))
