"""The ``kfe`` command: train, ablate, report, profile, diagnose, and what is registered.

::

    kfe train CONFIG [--out DIR] [--resume | --overwrite] [--set path.to.field=value ...]
              [--profile [--profile-steps N]]
              [--data-dir DIR]   # also for ablate, profile and diagnose
    kfe ablate CONFIG [--out DIR] [--workers N] [--set ...]
    kfe report RUN_DIR [--out DIR] [--target LOSS ...]
    kfe profile CONFIG [--out DIR] [--steps N] [--set ...]
    kfe diagnose CONFIG --layer NAME [--every N] [--out DIR] [--set ...]
    kfe rules            # registered rules, bases and layer types with their fields
    kfe schema           # JSON Schema of the experiment config

A bad config, an unknown field or a missing dataset ends with exit code 2 and one
message per problem naming the field path and the allowed values; no traceback. So does
a bad argument (a count below 1, a non-finite ``--target``, an ``--out`` that is a file,
a ``RUN_DIR`` with nothing to report), checked before anything is written.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kfe.data.paths import DATA_DIR_ENV
from kfe.experiment.config import (
    ConfigError,
    ExperimentConfigBase,
    apply_overrides,
    experiment_model,
    load_experiment,
    read_mapping,
    validate_experiment,
)

__all__ = ["main"]

USAGE_ERROR = 2
PROFILE_STEPS = 3
"""Active steps of ``kfe train --profile`` without ``--profile-steps``."""


def positive_int(text: str) -> int:
    """argparse ``type=`` of a count: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {value}")
    return value


def finite_float(text: str) -> float:
    """argparse ``type=`` of ``--target``: a finite number."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {value}")
    return value


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="experiment config (YAML or JSON)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a config field, e.g. --set optimizer.lr=0.01 (repeatable)",
    )
    parser.add_argument("--out", type=Path, help="output folder (default: runs/<name>)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="folder searched first for dataset files (the same as --set data.data_dir=DIR;"
        f" default: the config's, then ${DATA_DIR_ENV})",
    )


def _data_dir_override(args: argparse.Namespace) -> None:
    """``--data-dir DIR`` as the last ``--set`` (a JSON string, so YAML keeps it a str)."""
    if getattr(args, "data_dir", None) is not None:
        path = json.dumps(str(args.data_dir.expanduser()))
        args.overrides.append(f"data.data_dir={path}")


def _out(args: argparse.Namespace, default: Path) -> Path:
    """``--out`` (else ``default``) if it is a folder or can be made one; else a
    :class:`ConfigError` naming it (it exists as a file, or lies inside a file)."""
    path: Path = args.out or default
    for part in (path, *path.parents):
        if part.is_dir():
            return path
        if part.exists() or part.is_symlink():
            where = "exists and" if part == path else f"is inside {part}, which"
            fix = "give a folder path" if args.out else "pass --out DIR"
            name = "--out" if args.out else "the default output folder"
            raise ConfigError(f"{name}: {path} {where} is not a folder; {fix}")
    return path


def _runs(config: ExperimentConfigBase, suffix: str = "") -> Path:
    return Path("runs") / f"{config.name}{suffix}"


def cmd_train(args: argparse.Namespace) -> int:
    from kfe.distributed import exit_now, shutdown
    from kfe.experiment.setup import build_experiment
    from kfe.experiment.train import preflight, train

    if args.profile_steps is not None and not args.profile:
        raise ConfigError("--profile-steps: only used with --profile; add --profile or drop it")
    if args.overwrite and args.resume:
        raise ConfigError("--overwrite: starts the run over, --resume continues it; pick one")
    config = load_experiment(args.config, args.overrides)
    out = _out(args, _runs(config))
    try:
        exp = build_experiment(config)
        if args.profile:
            preflight(exp, config, out, args.resume, args.overwrite)  # before OUT/profile
            from kfe.experiment.profile import profile_experiment

            steps = PROFILE_STEPS if args.profile_steps is None else args.profile_steps
            profile_experiment(exp, out / "profile", steps=steps)
            exp = build_experiment(config)  # the profiled steps do not count
        last = train(config, out, resume=args.resume, overwrite=args.overwrite, experiment=exp)
    except BaseException:
        shutdown()  # under torchrun: leave the process group, then report the error
        raise
    if exp.is_main:
        print(json.dumps({"run_dir": str(out), **last}))
    if exp.world_size > 1:
        # every file is written and every collective has completed on this rank
        exit_now()
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from kfe.experiment.ablate import run_ablation

    raw = apply_overrides(read_mapping(args.config), args.overrides)
    config = validate_experiment(raw)
    out = _out(args, _runs(config, "-ablation"))
    rows = run_ablation(config, raw, out, workers=args.workers)
    failed = [r["run_id"] for r in rows if r["status"] != "done"]
    print(f"results: {out / 'results.csv'}")
    if failed:
        print(f"runs not done: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report; print its files as one JSON line (``out_dir``, ``summary``, the
    plots, ``sensitivity``: label -> plot)."""
    from kfe.experiment.report import write_report
    from kfe.experiment.runs import ReportError

    run_dir: Path = args.run_dir
    if not run_dir.exists():
        raise ConfigError(f"RUN_DIR: {run_dir} does not exist")
    if not run_dir.is_dir():
        raise ConfigError(f"RUN_DIR: {run_dir} is not a folder (give a run or an ablation folder)")
    out = _out(args, run_dir / "report")
    try:
        files = write_report(run_dir, out, targets=args.target or None)
    except ReportError as exc:
        raise ConfigError(f"RUN_DIR: {exc}") from None
    print(json.dumps(files.to_json()))
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from kfe.experiment.profile import profile_experiment
    from kfe.experiment.setup import build_experiment

    config = load_experiment(args.config, args.overrides)
    out = _out(args, _runs(config, "-profile"))
    exp = build_experiment(config)
    profile_experiment(exp, out, args.steps)
    return 0


def cmd_diagnose(args: argparse.Namespace) -> int:
    from kfe.experiment.diagnose import diagnose_experiment

    config = load_experiment(args.config, args.overrides)
    out = _out(args, _runs(config, "-diagnose"))
    diagnose_experiment(config, out, layers=args.layer, every=args.every, steps=args.steps)
    return 0


def cmd_rules(args: argparse.Namespace) -> int:
    from kfe.registry import default_registry

    registry = default_registry()

    def fields(config_cls: Any) -> str:
        parts = []
        for name, info in config_cls.model_fields.items():
            if name == "name":
                continue
            parts.append(f"{name}={info.default!r}")
        return ", ".join(parts) or "-"

    print("rules:")
    for name, rule in sorted(registry.rules.items()):
        needs = ",".join(sorted(s.value for s in rule.needs)) or "nothing"
        print(f"  {name:<10} needs={needs:<20} {fields(rule.Config)}")
    print("bases:")
    for name, source in sorted(registry.bases.items()):
        print(f"  {name:<10} {fields(source.Config)}")
    print("layer types:")
    for layer in registry.adapters:
        print(f"  {layer.__module__}.{layer.__qualname__}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(experiment_model().model_json_schema(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kfe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: list[tuple[str, Callable[[argparse.Namespace], int], str]] = [
        ("train", cmd_train, "train one config"),
        ("ablate", cmd_ablate, "run the config's ablation grid"),
        ("report", cmd_report, "plots and a summary of a run or an ablation"),
        ("profile", cmd_profile, "profile a few steps (TensorBoard trace + phase table)"),
        ("diagnose", cmd_diagnose, "curvature approximation error over training"),
        ("rules", cmd_rules, "registered rules, bases and layer types"),
        ("schema", cmd_schema, "JSON Schema of the experiment config"),
    ]
    parsers = {}
    for name, func, help_text in commands:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        parsers[name] = p
    for name in ("train", "ablate", "profile", "diagnose"):
        _config_args(parsers[name])
    parsers["train"].add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoint.pt"
    )
    parsers["train"].add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an OUT that holds a run (its checkpoint, metrics, summary and "
        "TensorBoard events are deleted); without it such an OUT is refused",
    )
    parsers["train"].add_argument(
        "--profile", action="store_true", help="profile a few steps first (OUT/profile)"
    )
    parsers["train"].add_argument(
        "--profile-steps",
        type=positive_int,
        metavar="N",
        help=f"active steps profiled with --profile (default {PROFILE_STEPS})",
    )
    parsers["ablate"].add_argument(
        "--workers", type=positive_int, help="parallel worker processes (default: ablate.workers)"
    )
    parsers["report"].add_argument("run_dir", type=Path, help="a run or an ablation folder")
    parsers["report"].add_argument("--out", type=Path, help="default: RUN_DIR/report")
    parsers["report"].add_argument(
        "--target",
        type=finite_float,
        action="append",
        help="target loss for time-to-target (a finite number; repeatable)",
    )
    parsers["profile"].add_argument("--steps", type=positive_int, default=3, help="active steps")
    diagnose = parsers["diagnose"]
    diagnose.add_argument("--layer", action="append", required=True, help="layer name")
    diagnose.add_argument("--every", type=positive_int, default=10, help="sample every N steps")
    diagnose.add_argument(
        "--steps", type=positive_int, help="training steps (default: the config's)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kfe`` console script; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a bad flag (argparse printed usage and the error), --help
        return exc.code if isinstance(exc.code, int) else USAGE_ERROR
    _data_dir_override(args)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"kfe {args.command}: error:\n{_indent(str(exc))}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as exc:  # a folder that cannot be made, a full disk: say so, no traceback
        print(f"kfe {args.command}: error:\n{_indent(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


if __name__ == "__main__":
    sys.exit(main())
