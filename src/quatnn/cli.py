"""The ``quatnn`` command: parses arguments and calls the packages; no logic of its own.

Each subcommand is one ``_add_<name>(commands)`` function that adds its parser and sets
``handler`` (a function of the parsed arguments returning the exit status), registered
in :data:`COMMANDS`. Bad input ends with one line on stderr and exit status 2, an
interruption with 130, a non-finite loss with 1, a reader of the output that went away
with 141 (as a SIGPIPE would) and no message.

``train``, ``compare`` and ``lottery`` launched by torchrun train data-parallel
(:mod:`quatnn.train.distributed`): only rank 0 prints results; the other ranks print only
their errors, marked with their rank.

Example:
    >>> main(["models", "--names", "lenet_300_100"])  # doctest: +NORMALIZE_WHITESPACE
    | model | variant | params | ratio to real | MACs |
    |---|---|---|---|---|
    | lenet_300_100 | real | 266,610 | 1.0000 | 266,200 |
    | lenet_300_100 | quaternion | 67,710 | 0.2540 | 266,200 |
    0
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import os
import pkgutil
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import quatnn
from quatnn import export, train  # each name imported on use: --help does not load torch
from quatnn.train.config import COMPARE_KEYS, DEFAULT_SEEDS, EVAL_SPLITS, FIELDS, parse_option
from quatnn.train.progress import PROGRESS_MODES

if TYPE_CHECKING:
    from quatnn.report import Report
    from quatnn.train.distributed import Context


class UsageError(Exception):
    """Bad command-line input found by a handler; the message is one line."""


def _user_errors() -> tuple[type[Exception], ...]:
    """The errors that are bad input (one line and exit status 2), imported when one
    is raised (torch has loaded by then)."""
    from quatnn.data.registry import DatasetMissingError
    from quatnn.report.runs import ReportError

    return (UsageError, train.RunError, ReportError, DatasetMissingError)


def _add_parser(
    commands: argparse._SubParsersAction,
    name: str,
    summary: str,
    description: str,
    examples: Sequence[str],
    **kwargs: object,
) -> argparse.ArgumentParser:
    """A subcommand parser: ``summary`` for ``quatnn --help``, then its own description
    and examples."""
    return commands.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, 80),
        epilog="examples:\n" + "\n".join(f"  {line}" for line in examples),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kwargs,
    )


def _comma_list(kind: type, empty: bool = True) -> Callable[[str], list]:
    """argparse type: a comma-separated list of ``kind``; ``empty=False`` wants an item."""

    def parse(text: str) -> list:
        try:
            items = [kind(item.strip()) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list: {text!r}") from None
        if not items and not empty:
            raise argparse.ArgumentTypeError("needs at least one comma-separated value")
        return items

    return parse


def _add_config_flags(parser: argparse.ArgumentParser, skip: Sequence[str] = ()) -> None:
    """One flag per :class:`~quatnn.train.TrainConfig` field; only flags given on the
    command line override the config file."""
    group = parser.add_argument_group(
        "run settings (defaults, overridden by --config FILE, overridden by these flags)"
    )
    for name, f in FIELDS.items():
        if name in skip:
            continue
        default = "none" if f.default is dataclasses.MISSING else f.default
        default = {True: "on", False: "off"}.get(default, default) if f.type == "bool" else default
        text = f"{f.metadata['help']} (default: {default})".replace("%", "%%")
        common = {"dest": name, "default": argparse.SUPPRESS, "help": text}
        flag = "--" + name.replace("_", "-")
        if f.type == "dict":
            group.add_argument("--option", action="append", metavar="KEY=VALUE", **common)
        elif f.type == "bool":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            group.add_argument(flag, type=kind, metavar=f.type.upper(), **common)


def _add_output_flags(parser: argparse.ArgumentParser, folder: str = "run") -> None:
    """``--config``, ``--overwrite`` (of the ``folder`` that ``--out`` names) and
    ``--progress``."""
    parser.add_argument("--config", metavar="FILE", help="TOML config or recipe to start from")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"delete the {folder} in the output folder, with everything in it, and start again",
    )
    parser.add_argument(
        "--progress",
        choices=PROGRESS_MODES,
        default="auto",
        help="progress bars on stderr; auto: only on a terminal (default: auto)",
    )
    parser.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log to OUT/tensorboard (needs the tensorboard package)",
    )
    parser.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="download a missing dataset (default: on)",
    )


def _overrides(args: argparse.Namespace) -> dict:
    """The settings given on the command line (config fields, variants and seeds)."""
    values = {name: getattr(args, name) for name in (*FIELDS, *COMPARE_KEYS) if hasattr(args, name)}
    if "options" in values:
        values["options"] = dict(parse_option(text) for text in values["options"])
    return values


def _run_options(args: argparse.Namespace) -> dict:
    return {"progress": args.progress, "tensorboard": args.tensorboard, "download": args.download}


def _add_jobs_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help=f"train {what} at a time, each in its own process (with GPUs: one GPU each, "
        "round-robin; on CPU the threads are split) (default: 1)",
    )


def _train(args: argparse.Namespace) -> int:
    from quatnn.prune import lottery as prune_lottery
    from quatnn.train import distributed

    overrides = _overrides(args)
    if args.resume is None:
        cfg, _ = train.load_config(args.config, overrides)
        out = args.out or train.default_run_dir(cfg)
        if_exists = "overwrite" if args.overwrite else "refuse"
    else:
        given = {"--config": args.config, "--overwrite": args.overwrite, "--out": args.out}
        clashes = [flag for flag, value in given.items() if value]
        if clashes:
            flags = ", ".join(clashes)
            raise UsageError(f"--resume RUN_DIR continues that run as it is; drop {flags}")
        lottery = prune_lottery.lottery_of_level(args.resume)
        if lottery is not None:
            raise UsageError(
                f"{args.resume} is a lottery level: quatnn train would resume it without its "
                f"pruning masks; continue its lottery: {prune_lottery.continue_command(lottery)}"
            )
        cfg, out, if_exists = train.resume_config(args.resume, overrides), args.resume, "resume"
    with distributed.session(cfg.backend, cfg.device):
        train.train(cfg, out, if_exists=if_exists, **_run_options(args))
    return 0


def _add_train(commands: argparse._SubParsersAction) -> None:
    parser = _add_parser(
        commands,
        "train",
        "train one model variant on one dataset into a run folder",
        "Train one model variant on one dataset. The run folder gets config.toml (every "
        "setting; an auto encoding stays auto), metrics.jsonl (one row per epoch), "
        "checkpoint.pt (after every epoch), best.pt (the best epoch: by validation accuracy "
        "with --val-split, else by test accuracy; --best-by loss: by loss), train.log and, "
        "at the end, summary.json. Ctrl-C or SIGTERM keeps the checkpoint of the last "
        "completed epoch; --resume continues from it.",
        [
            "quatnn train --model conv6 --variant quaternion --dataset cifar10 --epochs 60 \\",
            "    --lr 3e-4 --data-dir data --out runs/conv6-q",
            "quatnn train --resume runs/conv6-q        # continue after Ctrl-C or a crash",
            "quatnn train --config runs/conv6-q/config.toml --out runs/again   # run it again",
            "torchrun --nproc_per_node 4 -m quatnn train --model resnet18 --dataset cifar10 \\",
            "    --batch-size 256 --amp --sync-bn --out runs/r18   # 4 GPUs, global batch 256",
        ],
    )
    parser.add_argument(
        "--out", metavar="DIR", help="run folder (default: runs/MODEL-VARIANT-DATASET-sSEED)"
    )
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint"
    )
    _add_output_flags(parser)
    _add_config_flags(parser)
    parser.set_defaults(handler=_train)


def _compare(args: argparse.Namespace) -> int:
    from quatnn import report
    from quatnn.train import distributed

    cfg, extra = train.load_config(args.config, _overrides(args), compare=True)
    with distributed.session(cfg.backend, cfg.device) as ctx:
        train.compare(
            cfg,
            args.out,
            variants=extra.get("variants", ()),
            seeds=extra.get("seeds", DEFAULT_SEEDS),
            overwrite=args.overwrite,
            jobs=args.jobs,
            **_run_options(args),
        )
        return _reported(ctx, lambda: report.write_report([args.out]))


def _add_sweep_flags(
    parser: argparse.ArgumentParser, out: str, what: str, colour_variants: str
) -> None:
    """``--out``, ``--variants`` and ``--seeds`` of the commands that train many runs."""
    parser.add_argument("--out", metavar="DIR", default=out, help=f"{what} (default: %(default)s)")
    parser.add_argument(
        "--variants",
        type=_comma_list(str, empty=False),
        default=argparse.SUPPRESS,
        help=f"comma-separated variants (default: {colour_variants} for colour data, "
        "real,quaternion for grayscale)",
    )
    parser.add_argument(
        "--seeds",
        type=_comma_list(int, empty=False),
        default=argparse.SUPPRESS,
        help=f"comma-separated seeds (default: {','.join(map(str, DEFAULT_SEEDS))})",
    )


def _add_compare(commands: argparse._SubParsersAction) -> None:
    parser = _add_parser(
        commands,
        "compare",
        "train every variant x seed, then write the report (default: a 1-minute demo)",
        "Train a model in several variants and seeds into OUT/<variant>-s<seed>/ (finished "
        "runs are skipped and unfinished ones resumed, so the same command continues an "
        "interrupted comparison), then write the report into OUT. Without arguments: "
        "Lenet-300-100 real vs quaternion on the bundled digits data, 3 seeds, about a "
        "minute on a laptop CPU. A config file may also set variants and seeds; a single "
        "run's variant and seed in it are ignored.",
        [
            "quatnn compare",
            "quatnn compare --model conv6 --dataset cifar10 --variants real3,real4,quaternion \\",
            "    --seeds 0,1,2 --epochs 60 --lr 3e-4 --out runs/conv6-cifar10",
            "quatnn compare --config experiments/conv4_cifar10.toml --out runs/conv4",
            "quatnn compare --config experiments/conv4_cifar10.toml --jobs 4   # 4 GPUs at once",
        ],
    )
    _add_sweep_flags(parser, "runs/compare", "comparison folder", "real3,real4,quaternion")
    _add_jobs_flag(parser, "N runs")
    _add_output_flags(parser, "comparison (every run)")
    _add_config_flags(parser, skip=("variant", "seed"))
    parser.set_defaults(handler=_compare)


def _reported(ctx: Context, write: Callable[[], Report]) -> int:
    """Rank 0 writes and prints the report ``write()`` returns; every process waits for it
    (torchrun ends the other processes once one leaves)."""
    result = write() if ctx.is_main else None
    ctx.barrier()
    return 0 if result is None else _print_report(result)


def _print_report(result: Report) -> int:
    """Print a written report's table and where its main file is; exit status 0."""
    print(result.table)
    print(f"report: {result.files[0]}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from quatnn import report
    from quatnn.report import lottery as lottery_report

    lotteries = all(lottery_report.is_lottery(path) for path in args.runs)
    if lotteries and len(args.runs) == 1:
        result = lottery_report.write_lottery_report(args.runs[0], args.out)
    elif lotteries:
        if args.out is None:
            raise UsageError("a report of several lotteries needs --out, the folder to write to")
        result = lottery_report.write_lotteries_report(args.runs, args.out)
    else:
        result = report.write_report(args.runs, args.out)
    return _print_report(result)


def _add_report(commands: argparse._SubParsersAction) -> None:
    parser = _add_parser(
        commands,
        "report",
        "plots and a table from run folders (reads files only)",
        "Read the run folders at any depth below each folder given (a run, compare or "
        "lottery folder, or folders of those) and write accuracy.png and loss.png (one "
        "curve per row: runs that differ only in seed, mean ± std), throughput.png, "
        "report.md (the table, also printed) and report.json. Lottery folders alone get "
        "the lottery report instead (lottery.md, lottery.png, lottery_layers.png, "
        "lottery.json); several of them share its plot and table, each labelled by the "
        "settings in which their recipes differ.",
        [
            "quatnn report runs/compare",
            "quatnn report runs/a runs/b --out runs/a-vs-b",
            "quatnn report runs/lottery-element runs/lottery-quaternion --out runs/pruning",
        ],
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run folders, or folders holding them at any depth",
    )
    parser.add_argument(
        "--out", metavar="DIR", help="where to write the report (default: the one folder given)"
    )
    parser.set_defaults(handler=_report)


def _models(args: argparse.Namespace) -> int:
    from quatnn import models
    from quatnn.report import markdown_table

    try:
        rows = models.table(args.names, args.variants)
    except ValueError as err:
        raise UsageError(str(err)) from None
    shown = [
        {"model": r["name"], "variant": r["variant"], "params": f"{r['params']:,}",
         "ratio to real": f"{r['ratio_to_real']:.4f}", "MACs": f"{r['macs']:,}"}
        for r in rows
    ]  # fmt: skip
    print(markdown_table(shown))
    return 0


def _add_models(commands: argparse._SubParsersAction) -> None:
    parser = _add_parser(
        commands,
        "models",
        "list the model zoo: parameters, ratio to real, MACs",
        "Print a markdown table of the models and variants: parameters, their ratio to the "
        "real model, and multiply-accumulates for one image.",
        ["quatnn models --names conv2,conv4 --variants real4,quaternion"],
    )
    parser.add_argument(
        "--names", type=_comma_list(str, empty=False), help="comma-separated model names"
    )
    parser.add_argument(
        "--variants", type=_comma_list(str, empty=False), help="comma-separated variants"
    )
    parser.set_defaults(handler=_models)


_LOTTERY_FLAGS = (
    ("levels", int, "pruned levels after the dense level 0 (default: 20)"),
    ("method", str, "magnitude or random (default: magnitude)"),
    ("scope", str, "global or layerwise (default: global)"),
    ("rate", float, "fraction of the remaining weights pruned per level (default: 0.2)"),
    ("rates", _comma_list(str), "layerwise rates by layer type, e.g. conv=0.1,fc=0.2,output=0.1"),
    ("granularity", str, "element, or quaternion: whole quaternions by norm (default: element)"),
    ("skip", _comma_list(str), "comma-separated layers or layer types (conv, fc, output) to keep"),
    ("rewind", str, "rewind survivors to 0 (initialization), <k>it or <k>ep (default: 0)"),
    ("controls", _comma_list(str), "comma-separated controls: reinit, random (default: none)"),
    ("control_levels", _comma_list(int), "levels that get the controls (default: all)"),
    (
        "min_acc",
        float,
        "stop after a level whose final test accuracy is below this fraction (e.g. 0.9)",
    ),
)
"""The ``[lottery]`` settings as flags of ``quatnn lottery``: name, type, help."""


def _lottery(args: argparse.Namespace) -> int:
    settings = {name: getattr(args, name) for name, _, _ in _LOTTERY_FLAGS if hasattr(args, name)}
    if "rates" in settings:
        malformed = [text for text in settings["rates"] if "=" not in text]
        if malformed:
            raise UsageError(
                f"--rates takes TYPE=RATE pairs, e.g. conv=0.1,fc=0.2; got {malformed[0]!r}"
            )
        settings["rates"] = dict(parse_option(text) for text in settings["rates"])
    from quatnn import prune
    from quatnn.report import lottery as lottery_report
    from quatnn.train import distributed

    cfg, extra, lottery = prune.load_recipe(args.config, _overrides(args), settings)
    with distributed.session(cfg.backend, cfg.device) as ctx:
        prune.run_lottery(
            cfg,
            args.out,
            lottery,
            variants=extra.get("variants", ()),
            seeds=extra.get("seeds", DEFAULT_SEEDS),
            overwrite=args.overwrite,
            jobs=args.jobs,
            **_run_options(args),
        )
        return _reported(ctx, lambda: lottery_report.write_lottery_report(args.out))


def _add_lottery(commands: argparse._SubParsersAction) -> None:
    parser = _add_parser(
        commands,
        "lottery",
        "lottery tickets: train, prune, rewind, retrain, for real and quaternion models",
        "Iterative magnitude pruning with rewinding (Frankle & Carbin 2019) for every variant "
        "and seed: OUT/<variant>-s<seed>/level-<LL>/ is a run folder plus masks.pt and "
        "sparsity.json, the controls go to level-<LL>-reinit/ and level-<LL>-random/. "
        "Finished levels are skipped and an interrupted one resumes, so the same command "
        "continues an interrupted lottery. Then writes lottery.md, lottery.png, "
        "lottery_layers.png (weights left per layer) and lottery.json (the numbers) into "
        "OUT (also: quatnn report OUT). A config file may hold a [lottery] table of the "
        "pruning settings below, and variants and seeds.",
        [
            "quatnn lottery --model lenet_300_100 --dataset digits --levels 3 --rate 0.5 \\",
            "    --epochs 2 --seeds 0 --out runs/lottery-demo",
            "quatnn lottery --model conv4 --dataset cifar10 --variants real4,quaternion \\",
            "    --levels 20 --rate 0.2 --rewind 0 --seeds 0,1,2 --controls reinit,random \\",
            "    --epochs 40 --lr 3e-4 --out runs/lottery-conv4",
            "quatnn lottery --config experiments/lottery_conv4_cifar10.toml --out runs/conv4",
        ],
    )
    _add_sweep_flags(parser, "runs/lottery", "lottery folder", "real4,quaternion")
    group = parser.add_argument_group(
        "pruning (defaults, overridden by the [lottery] table of --config FILE, overridden "
        "by these flags)"
    )
    for name, kind, text in _LOTTERY_FLAGS:
        flag = "--" + name.replace("_", "-")
        group.add_argument(flag, dest=name, type=kind, default=argparse.SUPPRESS, help=text)
    _add_jobs_flag(parser, "N variant-and-seed chains of levels")
    _add_output_flags(parser, "lottery (every level of every run)")
    _add_config_flags(parser, skip=("variant", "seed"))
    parser.set_defaults(handler=_lottery)


def _export(args: argparse.Namespace) -> int:
    if args.sparse and args.format != "safetensors":
        raise UsageError("--sparse applies to --format safetensors only")
    if not args.fold and args.format == "safetensors":
        raise UsageError("--no-fold does not apply to safetensors (it stores quaternion weights)")
    try:
        result = export.export_run(
            args.run,
            args.format,
            args.out,
            fold=args.fold,
            checkpoint="best.pt" if args.best else "checkpoint.pt",
            check=args.check,
            opset=args.opset,
            exporter=args.onnx_exporter,
            sparse=args.sparse,
            data_dir=args.data_dir,
        )
    except (ValueError, FileNotFoundError, ImportError) as err:
        raise UsageError(str(err)) from None
    how = "folded" if result["folded"] else "as is"
    if result["format"] == "safetensors":
        how = "compact weights"
    line = f"{result['model']} ({how}) -> {result['path']}: {result['bytes'] / 2**20:.2f} MB"
    if result.get("max_abs_diff") is not None:
        runtime = "ONNX Runtime" if result["format"] == "onnx" else "reloaded"
        line += (
            f", {runtime} matches PyTorch (max abs diff {result['max_abs_diff']:.2g} on "
            f"batches {', '.join(map(str, result['batches']))})"
        )
    print(line)
    prepare = result["input"]
    h, w = prepare["image_size"]
    numbers = ", ".join(f"{k} {' '.join(f'{v:.4g}' for v in prepare[k])}" for k in ("mean", "std"))
    print(
        f"input (N, {', '.join(map(str, prepare['shape']))}): {prepare['encoding']}((x - mean) "
        f"/ std) of the {h}x{w} image x in [0, 1], {numbers} (kept in the file's metadata)"
    )
    if "classes" in result:
        names = result["classes"]
        shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
        print(f"output (N, {len(names)}): the logits of classes {shown}")
    if not result["finished"]:
        print(
            f"quatnn: note: {args.run} has not finished training (no summary.json); the "
            f"export holds the weights of its {result['checkpoint']}",
            file=sys.stderr,
        )
    return 0


def _add_export(commands: argparse._SubParsersAction) -> None:
    parser = _add_parser(
        commands,
        "export",
        "export a run's model: ONNX, TorchScript, torch.export, compact safetensors",
        "Rebuild the model of a run folder from its config.toml and checkpoint and export "
        "it for inference (dynamic batch axis). Quaternion models are folded into plain real "
        "layers first (--no-fold exports them as they are: slower, and ONNX cannot express "
        "the whitening batch norm). The exported file is loaded back (ONNX: with ONNX "
        "Runtime) and its outputs compared with the PyTorch model before it is written. "
        "safetensors writes the "
        "compact checkpoint (quaternion weights, about 1/4 of the real model; load it with "
        "quatnn.load).",
        [
            "quatnn export runs/conv4-q --format onnx --out conv4.onnx",
            "quatnn export runs/conv4-q --format pt2 --best",
            "quatnn export runs/conv4-q --format safetensors --sparse --out conv4.safetensors",
        ],
    )
    parser.add_argument("run", metavar="RUN_DIR", help="the run folder")
    parser.add_argument(
        "--format", choices=export.RUN_FORMATS, default="onnx", help="output format (default: onnx)"
    )
    parser.add_argument(
        "--out",
        metavar="PATH",
        help="output file, or a folder to write model.onnx, .ts, .pt2, ... into (default: RUN_DIR)",
    )
    parser.add_argument(
        "--fold",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fold quaternion layers and batch norms into plain real layers (default: on)",
    )
    parser.add_argument(
        "--best",
        action="store_true",
        help="export best.pt, not the last epoch (the best epoch: by validation accuracy in "
        "a run with --val-split, else by test accuracy; by loss in a run with --best-by "
        "loss)",
    )
    parser.add_argument(
        "--check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="load the export back and compare its outputs before writing it (default: on)",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=export.ONNX_OPSET,
        help=f"ONNX opset (default: {export.ONNX_OPSET}; the dynamo exporter writes "
        f"{export.ONNX_OPSET} or newer)",
    )
    parser.add_argument(
        "--onnx-exporter",
        choices=("dynamo", "legacy"),
        default="dynamo",
        help="torch.onnx exporter: dynamo (torch.export-based) or the legacy TorchScript one "
        "(default: dynamo)",
    )
    parser.add_argument(
        "--sparse",
        action="store_true",
        help="safetensors: store mostly-zero (pruned) weights sparse",
    )
    parser.add_argument(
        "--data-dir", metavar="DIR", help="dataset folder, if not the run's (imagefolder runs)"
    )
    parser.set_defaults(handler=_export)


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from quatnn.report import markdown_table
    from quatnn.train.checkpoint import write_atomic
    from quatnn.train.evaluate import evaluate_run

    result = evaluate_run(
        args.run,
        "best.pt" if args.best else "checkpoint.pt",
        args.split,
        data_dir=args.data_dir,
        device=args.device,
        batch_size=args.batch_size,
        download=args.download,
    )
    if args.json:  # first: a reader of the output that goes away loses nothing
        text = json.dumps(result, indent=2) + "\n"
        write_atomic(args.json, lambda f: f.write(text), "w")
    top5 = "" if result["top5"] is None else f", top-5 {result['top5']:.2%}"
    print(
        f"{result['run']} ({result['checkpoint']}, epoch {result['epoch']}) on "
        f"{result['images']:,} {result['split']} images: loss {result['loss']:.4f}, "
        f"acc {result['acc']:.2%}{top5}"
    )
    rows = [
        {"class": c["class"], "images": f"{c['images']:,}",
         "acc (%)": "-" if c["acc"] is None else f"{100 * c['acc']:.2f}",
         "most often taken for": c["taken_for"] or "-"}
        for c in result["per_class"]
    ]  # fmt: skip
    print(markdown_table(rows))
    if args.json:
        print(f"wrote {args.json} (every number, with the confusion matrix)")
    return 0


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    parser = _add_parser(
        commands,
        "evaluate",
        "evaluate a run's model on its test (or validation, training) images",
        "Rebuild the model and the data of a run folder as training built them (the same "
        "encoding, the same held-out validation images, no augmentation) and evaluate the "
        "last epoch's checkpoint (or best.pt): loss, accuracy, top-5 accuracy (more than "
        "10 classes), each class's accuracy and the class it is most often taken for. "
        "--json FILE also writes the confusion matrix.",
        [
            "quatnn evaluate runs/conv4-q",
            "quatnn evaluate runs/conv4-q --best --split val --json conv4-val.json",
        ],
    )
    parser.add_argument("run", metavar="RUN_DIR", help="the run folder")
    parser.add_argument(
        "--best", action="store_true", help="evaluate best.pt, not the last epoch's checkpoint"
    )
    parser.add_argument(
        "--split",
        choices=EVAL_SPLITS,
        default="test",
        help="test, val (runs trained with --val-split) or train (the images it trained "
        "on, unaugmented) (default: test)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    parser.add_argument("--data-dir", metavar="DIR", help="dataset folder, if not the run's")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, ..."
    )
    parser.add_argument(
        "--batch-size", type=int, metavar="N", help="batch size (default: the run's)"
    )
    parser.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="download the dataset if it is missing (default: off)",
    )
    parser.set_defaults(handler=_evaluate)


def _benchmarks() -> list[str]:
    """The modules of :mod:`quatnn.bench` that have a ``main(argv)`` (imported to look)."""
    try:
        package = importlib.import_module("quatnn.bench")
    except ImportError:
        return []
    names = [m.name for m in pkgutil.iter_modules(package.__path__) if not m.ispkg]
    return [n for n in names if callable(getattr(_bench_module(n), "main", None))]


def _bench_module(name: str) -> object:
    return importlib.import_module(f"quatnn.bench.{name}")


class _BenchHelp(argparse.Action):
    """``-h``/``--help`` of ``quatnn bench``: lists the benchmarks found when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show this help and the benchmarks")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        parser.description += f" Available: {', '.join(_benchmarks()) or 'none'}."
        parser.print_help()
        parser.exit()


def _bench(args: argparse.Namespace) -> int:
    available = _benchmarks()
    if args.name is None:
        raise UsageError(f"bench: name a benchmark: {', '.join(available)}")
    if args.name not in available:
        raise UsageError(f"unknown benchmark {args.name!r}; available: {', '.join(available)}")
    try:
        status = _bench_module(args.name).main(list(args.args))
    except ValueError as err:  # a model, variant or size the benchmark cannot build
        raise UsageError(f"bench {args.name}: {err}") from None
    return status if isinstance(status, int) else 0


def _add_bench(commands: argparse._SubParsersAction) -> None:
    parser = _add_parser(
        commands,
        "bench",
        "run a benchmark: quatnn bench NAME [ARGS...]",
        "Run benchmark NAME (a module of quatnn.bench) with its own arguments; "
        "quatnn bench NAME --help shows them.",
        ["quatnn bench layers --help"],
        add_help=False,
    )
    parser.add_argument("-h", "--help", action=_BenchHelp)
    parser.add_argument("name", metavar="NAME", nargs="?", help="the benchmark")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    parser.set_defaults(handler=_bench)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_train,
    _add_compare,
    _add_lottery,
    _add_report,
    _add_evaluate,
    _add_export,
    _add_models,
    _add_bench,
]
"""Subcommand registrations, in the order ``quatnn --help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The ``quatnn`` argument parser with every subcommand of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="quatnn",
        description="Quaternion neural networks: train and compare real and quaternion models.",
        epilog="start with:  quatnn compare   (Lenet-300-100 real vs quaternion, offline, ~1 min)",
    )
    parser.add_argument("--version", action="version", version=f"quatnn {quatnn.__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in COMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``quatnn`` command with ``argv`` (default: ``sys.argv[1:]``); returns the
    exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    rank = 0
    if "WORLD_SIZE" in os.environ:  # launched by torchrun
        from quatnn.train import distributed

        rank = distributed.env_rank()
    who = f"quatnn (rank {rank})" if rank else "quatnn"
    try:
        return args.handler(args)
    except KeyboardInterrupt:  # (first: _user_errors imports torch, which may be half-loaded)
        print(f"{who}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as err:
        print(f"{who}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except train.NonFiniteLoss as err:  # every rank stops at the same step: rank 0 says it
        if not rank:
            print(f"quatnn: error: {err}", file=sys.stderr)
        return 1
    except train.Interrupted as err:
        if not rank:
            print(f"quatnn: {err}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout left (quatnn evaluate ... | head)
        with contextlib.suppress(OSError, ValueError):  # no second error at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a command killed by SIGPIPE
    except OSError as err:  # a path that cannot be written (or read): not a directory, ...
        print(f"{who}: error: {err}", file=sys.stderr)
        return 2
