"""The ``vid2vid`` console script.

Every subcommand takes ``key=value`` arguments that address the typed config (``preset=NAME`` first
loads ``experiments/configs/NAME.yaml``). Subcommands that address one section accept that section's
keys without the prefix (``vid2vid prepare source=... clip_len=30`` means ``data.source=...``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from vid2vid.config import Config, config_from_overrides, parse_overrides, split_key_values


def _config(args: list[str], default_section: str | None = None) -> Config:
    """Load a Config; bare keys of ``default_section`` are that section's (``ngf=8`` is ``model.ngf=8``)."""
    return config_from_overrides(parse_overrides(args, default_section))


def cmd_model_summary(args: list[str]) -> int:
    from vid2vid.models.summary import format_summary, summarize

    cfg = _config(args, "model")
    print(format_summary(summarize(cfg.model), title=f"vid2vid model summary ({cfg.name})"))
    return 0


def cmd_prepare(args: list[str]) -> int:
    from vid2vid.console import is_verbose
    from vid2vid.datasets.prepare import prepare
    from vid2vid.platform.trainer import ensure_ray

    cfg = _config(args, "data")
    summary = prepare(cfg.data, progress=is_verbose(), start_ray=ensure_ray)  # Ray starts once there is work
    print(summary.format())
    return 0


# name -> (handler, help). A handler is a function here or "module:function" imported on use, so
# `vid2vid --help` does not pay for importing Ray, torch and MLflow.
COMMANDS: dict[str, tuple[Callable[[list[str]], int] | str, str]] = {
    "model-summary": (cmd_model_summary, "print parameters per sub-network of a preset's model"),
    "prepare": (cmd_prepare, "prepare clips into Parquet shards with ground-truth flow (Ray Data)"),
    "generate": ("vid2vid.generate.commands:generate_command",
                 "render a label folder, video or shards to mp4 from a checkpoint (any length)"),
    "fit-styles": ("vid2vid.generate.commands:fit_styles_command",
                   "fit per-class Gaussian mixtures of encoder features for style sampling"),
    "predict": ("vid2vid.generate.commands:predict_command", "predict future label maps and render them with vid2vid"),
    "predict-train": ("vid2vid.generate.commands:predict_train_command",
                      "train the baseline future label-map predictor on shards"),
    "evaluate": ("vid2vid.platform.evaluation:evaluate_command",
                 "video FID (I3D, ResNeXt), FVD and warping error of a checkpoint, into its MLflow run"),
    "sweep": ("vid2vid.platform.sweep:main",
              "Ray Tune ablation sweep (variants x seeds x grid), one MLflow child run per trial"),
    "ab-pairs": ("vid2vid.abtest:main_pairs",
                 "export blinded, randomised side-by-side A/B video pairs plus an answer key"),
    "ab-score": ("vid2vid.abtest:main_score", "A/B preference rates with 95% intervals (Wilson; bootstrap over pairs)"),
    "sync-tracking": ("vid2vid.platform.sync_tracking:main",
                      "push the tracking records kept offline under run_dir=DIR into their own MLflow runs, once"),
}


# Commands whose checkpoint= may also name a run folder, a run name or an MLflow run id (see
# vid2vid.platform.locate); run_dir= and tracking_uri= say where to look and are consumed here,
# except by `evaluate`, which also logs to tracking_uri.
CHECKPOINT_COMMANDS = ("generate", "fit-styles", "predict", "evaluate")


def _checkpoint_args(command: str, args: list[str]) -> list[str]:
    """Replace ``checkpoint=<any spelling>`` by the checkpoint folder it names."""
    if command not in CHECKPOINT_COMMANDS or not any(a.startswith("checkpoint=") for a in args):
        return args
    from vid2vid.platform.locate import locate_checkpoint

    # the noun the command's own parser would use for an argument that is not key=value
    pairs = split_key_values(args, noun="override" if command == "evaluate" else "argument")
    where = {"run_dir": "runs", "tracking_uri": None}
    rest = []
    for arg, kv in zip(args, pairs, strict=True):
        if kv.key in where:
            where[kv.key] = kv.text
            if kv.key == "tracking_uri" and command == "evaluate":
                rest.append((arg, kv))
        else:
            rest.append((arg, kv))
    return [f"checkpoint={locate_checkpoint(kv.text, where['run_dir'], where['tracking_uri'])}"
            if arg.startswith("checkpoint=") else arg for arg, kv in rest]


def _handler(name: str) -> Callable[[list[str]], int]:
    handler = COMMANDS[name][0]
    if isinstance(handler, str):
        module, _, func = handler.partition(":")
        handler = getattr(importlib.import_module(module), func)
    return handler


def main(argv: list[str] | None = None) -> int:
    from vid2vid.console import VERBOSE_FLAGS, run_main

    parser = argparse.ArgumentParser(
        prog="vid2vid",
        description="Train, ablate and evaluate vid2vid video-to-video synthesis on Ray.",
        epilog="Arguments are key=value config overrides; preset=NAME loads experiments/configs/NAME.yaml. "
               "--verbose (anywhere) shows Ray's own logs and tracebacks.",
    )
    parser.add_argument(*VERBOSE_FLAGS, action="store_true", help="show Ray's and MLflow's logs and tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        escaped = help_text.replace("%", "%%")  # argparse formats help strings with %
        p = sub.add_parser(name, help=escaped, description=escaped)
        p.add_argument("overrides", nargs="*", metavar="key=value")
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = [a for a in args if a in VERBOSE_FLAGS]
    ns = parser.parse_args([a for a in args if a not in VERBOSE_FLAGS])
    if ns.command is None:
        parser.print_help()
        return 2
    return run_main(f"vid2vid {ns.command}", lambda rest: _handler(ns.command)(_checkpoint_args(ns.command, rest)),
                    [*verbose, *ns.overrides])

if __name__ == "__main__":
    sys.exit(main())
