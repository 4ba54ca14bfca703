"""Ray Tune ablation sweeps: variants x seeds (x any ``key=[v1, v2]`` grid), one MLflow child run per trial.

The paper's Table 2 compares the full model with three ablations; here each is a config switch whose
``False`` means the component is not built at all (so parameter counts differ):

    full                    -
    no_fg_bg_prior          model.fg_bg_prior=false          (no foreground branch / mask split)
    no_video_discriminator  model.video_discriminator=false  (no D_V; D_I only)
    no_flow_warping         model.flow_warping=false         (no flow head, no mask head)

Ray 2.60 runs Ray Train V2, where a ``TorchTrainer`` is no longer a Tune trainable: a trial is a
*function* trainable (:func:`run_trial`) that builds and fits the TorchTrainer itself
(:func:`vid2vid.platform.trainer.train`), then evaluates the final checkpoint, then reports once to
Tune. The trial actor reserves only ``trial_cpus`` (it mostly waits); the Train workers request
their own resources outside the trial's placement group, so the number of trials running at once is
capped by ``max_concurrent_trials`` (default: what the cluster can hold, from the config's per-trial
need) — on 2 CPUs that is one at a time, so trials never wait on each other's CPUs.

Fault tolerance, two layers: a trial that fails is retried by Tune (``max_failures``); its retry
uses the same Ray Train run name, so training resumes from the trial's last checkpoint and metrics
continue in the same MLflow child run. A sweep whose driver died is resumed by running the same
command again (same ``name``): :func:`run_sweep` finds the Tune experiment under
``<run_dir>/sweeps/<name>`` and calls ``Tuner.restore``, which re-runs only unfinished trials.

MLflow: one parent run per sweep (id kept in ``<sweep dir>/parent_run_id.txt`` so a restore reuses
it), one child run per trial (tag ``mlflow.parentRunId``; params and tags ``variant``, ``seed``;
metrics ``params/generator``, ``params/discriminator`` and the evaluation metrics). When every trial is
done the parent gets ``comparison/`` artifacts: trials.csv, comparison.csv, comparison.md,
metrics.png, loss_curves.png (see :mod:`vid2vid.platform.compare`). During a tracking outage each of these
runs keeps its records under its own key (parent ``sweep:<name>``, trial ``<name>-<trial label>``) and
they are replayed at the end of each trial and of the sweep, or by ``vid2vid sync-tracking``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vid2vid.config import (
    Config,
    ConfigError,
    apply_mapping,
    config_from_overrides,
    flatten,
    number_or_text,
    read_value,
    split_key_values,
    to_dict,
    yaml_value,
)
from vid2vid.platform.compare import (
    LossHistory,
    TrialRecord,
    comparison_markdown,
    headline_metrics,
    metric_columns,
    plot_loss_curves,
    plot_metrics,
    summarize,
    write_comparison_csv,
    write_trials_csv,
)

log = logging.getLogger("vid2vid.sweep")

VARIANTS: dict[str, dict[str, bool]] = {
    "full": {},
    "no_fg_bg_prior": {"model.fg_bg_prior": False},
    "no_video_discriminator": {"model.video_discriminator": False},
    "no_flow_warping": {"model.flow_warping": False},
}
PARENT_ID_FILE = "parent_run_id.txt"
DEFINITION_FILE = "sweep.json"  # the base config, shards and options, frozen when the sweep starts
ATTEMPTS_FILE = "attempts.jsonl"  # one line per trial start and finish: shows what a restore re-ran
LOSS_CURVES = ("G/total", "D/total")


@dataclass
class SweepConfig:
    name: str = ""  # "" = "<cfg.name>-ablation"; the same name resumes the same sweep
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    seeds: list[int] = field(default_factory=lambda: [0])
    grid: dict[str, list[Any]] = field(default_factory=dict)  # extra axes: dotted config key -> values
    max_concurrent_trials: int = 0  # 0 = as many as the cluster holds (see concurrent_trials)
    trial_cpus: float = 0.5  # the trial actor itself (drives the TorchTrainer, then the evaluation)
    data_cpus: float = 1.0  # CPUs left free per trial for Ray Data ingest and the eval actor pools
    max_failures: int = 1  # Tune retries of a failed trial
    evaluate: bool = True  # run the eval service on each trial's final checkpoint
    eval_cpus_per_actor: float = 0.5  # per eval actor pool (the service runs up to 3 pools at once)
    eval_input_sizes: dict[str, int] = field(default_factory=dict)  # test only: see eval.service
    resume: bool = True  # an existing sweep of the same name is restored; false: refuse to touch it


@dataclass(frozen=True)
class TrialSpec:
    variant: str
    seed: int
    grid: tuple[tuple[str, Any], ...] = ()  # the trial's values of the grid axes

    @property
    def group(self) -> str:
        """What the comparison table aggregates over seeds."""
        return " ".join([self.variant, *(f"{k}={v}" for k, v in self.grid)])

    @property
    def label(self) -> str:
        extra = "".join(f"-{k.split('.')[-1]}{v}" for k, v in self.grid)
        return f"{self.variant}{extra}-s{self.seed}"


@dataclass
class SweepResult:
    name: str
    path: Path  # the Tune experiment folder
    parent_run_id: str | None
    tracking_uri: str
    trials: list[TrialRecord]
    errors: dict[str, str]  # trial label -> error, for trials that failed after their retries
    artifacts: list[Path]


# ------------------------------------------------------------------------------------------------
# Trial configs


def variant_overrides(variant: str) -> dict[str, bool]:
    if variant not in VARIANTS:
        raise ConfigError(f"sweep variant {variant!r} is unknown; valid variants: {list(VARIANTS)}")
    return dict(VARIANTS[variant])


def trial_config(base: Config, spec: TrialSpec) -> Config:
    """The base config with the variant's switches, the grid values and the seed applied."""
    cfg = copy.deepcopy(base)
    apply_mapping(cfg, {**variant_overrides(spec.variant), **dict(spec.grid), "train.seed": spec.seed})
    return cfg


def trial_specs(base: Config, sweep: SweepConfig) -> list[TrialSpec]:
    """Every trial of the sweep, validated up front: a bad variant or grid value fails before Ray starts."""
    axes = [[(k, v) for v in values] for k, values in sweep.grid.items()]
    combos: list[tuple[tuple[str, Any], ...]] = [()]
    for axis in axes:
        if not axis:
            raise ConfigError(f"sweep grid key {axis!r} has no values")
        combos = [c + (kv,) for c in combos for kv in axis]
    if not sweep.variants or not sweep.seeds:
        raise ConfigError("sweep: variants and seeds must each list at least one value")
    specs = [TrialSpec(v, int(s), c) for v in sweep.variants for c in combos for s in sweep.seeds]
    for spec in specs:
        trial_config(base, spec)  # raises ConfigError naming the key
    return specs


def parameter_counts(cfg: Config) -> dict[str, int]:
    from vid2vid.models.summary import summarize as model_summary

    s = model_summary(cfg.model)
    return {"params/generator": s.generator_total, "params/discriminator": s.discriminator_total,
            "params/total": s.generator_total + s.discriminator_total}


def concurrent_trials(cfg: Config, sweep: SweepConfig, resources: dict[str, float]) -> int:
    """How many trials fit at once: the cluster divided by one trial's need (the trial actor, its Train
    workers and ``data_cpus`` for ingest/eval). Never below 1."""
    if sweep.max_concurrent_trials > 0:
        return sweep.max_concurrent_trials
    t = cfg.train
    if t.use_gpu:
        need, have = t.num_workers * t.gpus_per_worker, resources.get("GPU", 0.0)
    else:
        need, have = sweep.trial_cpus + t.num_workers * t.cpus_per_worker + sweep.data_cpus, resources.get("CPU", 1.0)
    return max(1, math.floor(have / need + 1e-9))


# ------------------------------------------------------------------------------------------------
# The trial (runs in a Tune trial actor)


def run_trial(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """Tune function trainable: train one variant x seed, evaluate it, log it, report it once.

    ``config`` is the trial's point of the search space; ``ctx`` the sweep's frozen definition
    (``sweep.json``), passed with ``tune.with_parameters`` so it stays out of every trial's printout.
    """
    from ray import tune

    from vid2vid.platform.tracking import Tracker
    from vid2vid.platform.trainer import train

    spec = TrialSpec(config["variant"], int(config["seed"]), tuple(sorted((config.get("grid") or {}).items())))
    cfg = trial_config(apply_mapping(Config(), ctx["base"]), spec)
    cfg.train.run_name = trial_run_name(ctx["name"], spec)
    sweep_dir = Path(ctx["path"])
    _attempt(sweep_dir, spec, "start")
    parent_key = ctx.get("parent_key")  # absent in sweeps defined before it existed
    result = train(cfg, ctx["shards"], extra_tags=trial_tags(ctx["name"], spec), parent_run_id=ctx["parent_run_id"],
                   parent_key=parent_key)

    counts = parameter_counts(cfg)
    # the trainer's run key is the run name: this tracker joins that run, even if it exists only offline
    tracker = Tracker(result.tracking_uri, cfg.train.experiment, run_name=result.run_name, run_id=result.mlflow_run_id,
                      run_dir=cfg.train.run_dir, key=result.run_name, writer="trial", parent_key=parent_key)
    log_trial_identity(tracker, spec, counts)
    metrics: dict[str, float] = {**counts, **_final_losses(result.metrics)}
    if ctx["options"]["evaluate"] and result.checkpoint:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False  # one bar per trial drowns the log
        metrics.update(_evaluate(cfg, result, ctx))
    tracker.end("FINISHED")
    tracker.replay(wait=True)
    _attempt(sweep_dir, spec, "finish")
    tune.report({**metrics, "variant": spec.variant, "seed": spec.seed, "mlflow_run_id": tracker.run_id or "",
                 "checkpoint_dir": result.checkpoint or ""})


def trial_run_name(name: str, spec: TrialSpec) -> str:
    """The trial's Ray Train run name, which is also its MLflow run's tracking key."""
    return f"{name}-{spec.label}"


def sweep_parent_key(name: str) -> str:
    """The sweep's parent run's tracking key."""
    return f"sweep:{name}"


def trial_tags(name: str, spec: TrialSpec) -> dict[str, str]:
    """Tags of a child run (besides ``mlflow.parentRunId``): what the MLflow search box filters on."""
    return {"sweep": name, "variant": spec.variant, "seed": str(spec.seed), "trial": spec.label,
            "sweep/group": spec.group}


def parent_tags(name: str, preset: str, note: str) -> dict[str, str]:
    return {"sweep": name, "sweep/role": "parent", "preset": preset, "mlflow.note.content": note}


def log_trial_identity(tracker, spec: TrialSpec, counts: dict[str, int]) -> None:
    """Variant and seed as params (the compare view's rows), parameter counts as metrics (sortable columns)."""
    tracker.log_params({"variant": spec.variant, "seed": spec.seed, **dict(spec.grid)})
    tracker.log_metrics(counts, step=0)


def _final_losses(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k.startswith(("G/", "D/")) and isinstance(v, (int, float))}


def _evaluate(cfg: Config, result, ctx: dict[str, Any]) -> dict[str, float]:
    """The eval service on the final checkpoint; it logs into the child run itself. Metrics it cannot
    compute (no feature-net weights given) are skipped there, with a tag saying which file to supply."""
    try:
        from vid2vid.platform.evaluation import evaluate_and_log
    except ImportError:  # the service is optional at import time: training results still count
        log.warning("vid2vid.eval.service is not available; trial %s is not evaluated", cfg.train.run_name)
        return {}
    opts = ctx["options"]
    ev = evaluate_and_log(result.checkpoint, ctx["shards"], cfg.eval, run_id=result.mlflow_run_id,
                          tracking_uri=result.tracking_uri, run_dir=cfg.train.run_dir,
                          input_sizes=opts.get("eval_input_sizes") or None, actors=1,
                          cpus_per_actor=opts["eval_cpus_per_actor"])
    return dict(ev.metrics)


def _attempt(sweep_dir: Path, spec: TrialSpec, event: str) -> None:
    with (sweep_dir / ATTEMPTS_FILE).open("a") as f:
        f.write(json.dumps({"label": spec.label, "event": event, "pid": os.getpid(), "time": time.time()}) + "\n")


def read_attempts(sweep_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(sweep_dir) / ATTEMPTS_FILE
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def _trial_dirname(trial) -> str:
    c = trial.config
    spec = TrialSpec(c["variant"], int(c["seed"]), tuple(sorted((c.get("grid") or {}).items())))
    return f"{spec.label}-{trial.trial_id}"


# ------------------------------------------------------------------------------------------------
# The driver


def resolve_paths(cfg: Config) -> Config:
    """Absolute run_dir, shards and tracking URI: Tune runs each trial in its own working directory."""
    from vid2vid.platform.tracking import resolve_tracking_uri
    from vid2vid.storage import local_path, normalize

    cfg = copy.deepcopy(cfg)
    # Tune's trial folders, the parent run id and the attempts log are plain files: a local (or shared,
    # e.g. EFS) folder; the shards may be anywhere (Ray Data reads URIs).
    cfg.train.run_dir = str(local_path(cfg.train.run_dir, "train.run_dir of a sweep"))
    cfg.data.out = normalize(cfg.data.out)
    cfg.train.tracking_uri = resolve_tracking_uri(cfg.train.tracking_uri, cfg.train.run_dir)
    cfg.train.run_name = None  # set per trial
    return cfg


def sweep_name(cfg: Config, sweep: SweepConfig) -> str:
    return sweep.name or f"{cfg.name}-ablation"


def run_sweep(cfg: Config, sweep: SweepConfig, shards: str | Path | None = None) -> SweepResult:
    """Run (or resume) the sweep, then write the comparison onto the parent run."""
    import ray
    from ray import tune

    from vid2vid.platform.experiment import ensure_shards
    from vid2vid.platform.tracking import Tracker
    from vid2vid.platform.trainer import ensure_ray
    from vid2vid.storage import normalize

    cfg = resolve_paths(cfg)
    specs = trial_specs(cfg, sweep)
    name = sweep_name(cfg, sweep)
    storage = Path(cfg.train.run_dir) / "sweeps"
    path = storage / name
    ensure_ray()
    shards = normalize(shards) if shards else ensure_shards(cfg)
    if sweep.evaluate:
        from vid2vid.platform.evaluation import check_eval_split

        check_eval_split(cfg, shards)  # no validation split: say so before any trial trains
    restoring = tune.Tuner.can_restore(str(path))
    if restoring and not sweep.resume:
        raise FileExistsError(f"{path}: a sweep named {name!r} exists; pass resume=true to continue it or "
                              f"choose another name=")

    path.mkdir(parents=True, exist_ok=True)
    parent_id = (path / PARENT_ID_FILE).read_text().strip() if (path / PARENT_ID_FILE).is_file() else None
    parent = Tracker(cfg.train.tracking_uri, cfg.train.experiment, run_name=name, run_id=parent_id,
                     run_dir=cfg.train.run_dir, key=sweep_parent_key(name), writer="sweep",
                     run_id_file=path / PARENT_ID_FILE,  # written once the run exists (maybe after an outage)
                     tags=parent_tags(name, cfg.name, _parent_note(name, sweep, len(specs))))
    if parent_id is None:
        parent.log_params({**{f"sweep.{k}": v for k, v in asdict(sweep).items()}, **flatten(cfg)})

    definition = path / DEFINITION_FILE
    if restoring and definition.is_file():
        ctx = json.loads(definition.read_text())
        if ctx["base"] != to_dict(cfg) or ctx["options"] != asdict(sweep):
            log.warning("sweep %s resumes with the config it started with (%s); overrides given now are ignored",
                        name, definition)
    else:
        ctx = {"base": to_dict(cfg), "shards": str(shards), "name": name, "path": str(path),
               "parent_run_id": parent.run_id, "parent_key": parent.key, "options": asdict(sweep)}
        definition.write_text(json.dumps(ctx, indent=1))
    opts = ctx["options"]
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"cpu": opts["trial_cpus"]})
    if restoring:
        log.info("resuming sweep %s from %s (finished trials are not re-run)", name, path)
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        concurrency = concurrent_trials(cfg, sweep, ray.cluster_resources())
        space: dict[str, Any] = {"variant": tune.grid_search(list(sweep.variants)),
                                 "seed": tune.grid_search([int(s) for s in sweep.seeds])}
        if sweep.grid:
            space["grid"] = {k: tune.grid_search(list(v)) for k, v in sweep.grid.items()}
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=sweep.max_failures)))
    grid = tuner.fit()
    records, errors = _records(grid)
    artifacts = write_comparison(records, parent, path / "comparison", title=name)
    parent.set_tags({"sweep/trials": len(records), "sweep/failed_trials": len(errors)})
    parent.end("FAILED" if errors else "FINISHED")
    _replay_sweep(parent, cfg, name, specs)
    return SweepResult(name, path, parent.run_id, cfg.train.tracking_uri, records, errors, artifacts)


def _replay_sweep(parent, cfg: Config, name: str, specs: list[TrialSpec]) -> None:
    """End of the sweep: the parent's and every trial's records kept during an outage go to MLflow now."""
    from vid2vid.platform.sync_tracking import sync_run_dir

    parent.replay(wait=True)
    reports = sync_run_dir(cfg.train.run_dir, keys=[trial_run_name(name, s) for s in specs])
    left = parent.pending() + sum(r.pending for r in reports)
    if left:
        log.warning("%d tracking records of sweep %s wait under %s (MLflow at %s does not answer); when it does, "
                    "run: vid2vid sync-tracking run_dir=%s", left, name, parent.journal.root, parent.uri,
                    cfg.train.run_dir)


def _records(grid) -> tuple[list[TrialRecord], dict[str, str]]:
    records, errors = [], {}
    for r in grid:
        c = r.config
        spec = TrialSpec(c["variant"], int(c["seed"]), tuple(sorted((c.get("grid") or {}).items())))
        if r.error is not None:
            errors[spec.label] = f"{type(r.error).__name__}: {str(r.error)[:500]}"
            continue
        m = r.metrics or {}
        numbers = {k: float(v) for k, v in m.items() if _metric_key(k) and isinstance(v, (int, float))}
        records.append(TrialRecord(spec.group, spec.variant, spec.seed, spec.label, m.get("mlflow_run_id") or None,
                                   numbers))
    return records, errors


def _metric_key(k: str) -> bool:
    return k.startswith(("G/", "D/", "params/", "eval/", "random_weights/"))


def write_comparison(records: list[TrialRecord], parent, out: Path, title: str = "") -> list[Path]:
    """trials.csv, comparison.csv/.md, metrics.png, loss_curves.png into ``out`` and onto the parent run."""
    out.mkdir(parents=True, exist_ok=True)
    every = metric_columns(records)
    metrics = headline_metrics(every)
    summaries = summarize(records, metrics)
    md = out / "comparison.md"
    md.write_text(comparison_markdown(summaries, metrics, title))
    files = [write_trials_csv(records, every, out / "trials.csv"),
             write_comparison_csv(summaries, metrics, out / "comparison.csv"), md]
    if records:
        files.append(plot_metrics(records, metrics, out / "metrics.png"))
        histories = _loss_histories(parent.client, records)
        if histories:
            files.append(plot_loss_curves(histories, out / "loss_curves.png"))
    for f in files:
        parent.log_artifact(f, artifact_path="comparison")
    return files


def _loss_histories(client, records: list[TrialRecord]) -> list[LossHistory]:
    out = []
    for r in records:
        if not r.run_id:
            continue
        curves = {}
        for m in LOSS_CURVES:
            try:
                curves[m] = [(h.step, h.value) for h in client.get_metric_history(r.run_id, m)]
            except Exception as exc:  # noqa: BLE001 - a missing history costs a plot line, not the sweep
                log.warning("no %s history for run %s: %s", m, r.run_id, exc)
        out.append(LossHistory(r.label, r.group, curves))
    return out


def _parent_note(name: str, sweep: SweepConfig, trials: int) -> str:
    grid = ", ".join(f"{k} in {v}" for k, v in sweep.grid.items())
    return (f"Ablation sweep `{name}`: {trials} trials = variants {sweep.variants} x seeds {sweep.seeds}"
            f"{' x ' + grid if grid else ''}. Child runs hold each trial; artifacts/comparison holds the table "
            f"and plots.")


# ------------------------------------------------------------------------------------------------
# Command line: sweep options, grid axes and config overrides in one key=value list


def parse_sweep_args(args: list[str]) -> tuple[Config, SweepConfig]:
    """``variants=[full,no_flow_warping] seeds=[0,1] grid.model.ngf=[16,32] preset=smoke train.lr=1e-4``.

    Keys of :class:`SweepConfig` (optionally ``sweep.``-prefixed) set the sweep; ``grid.<config key>``
    adds a grid axis (a YAML list); everything else is a config override.
    """
    fields = SweepConfig.__dataclass_fields__
    sweep = SweepConfig()
    overrides: dict[str, Any] = {}
    for kv in split_key_values(args, noun="argument"):
        key = kv.key.removeprefix("sweep.")
        if key.startswith("grid."):
            values = yaml_value(kv.text)
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{key}: expected a non-empty list such as [1, 2], got {kv.text!r}")
            sweep.grid[key[len("grid."):]] = [number_or_text(v) for v in values]
        elif key in fields and key != "grid":
            setattr(sweep, key, _sweep_value(key, yaml_value(kv.text)))
        else:
            overrides[kv.key] = read_value(kv.text)
    for v in sweep.variants:
        variant_overrides(v)
    return config_from_overrides(overrides), sweep


def _sweep_value(key: str, value: Any) -> Any:
    default = getattr(SweepConfig(), key)
    if isinstance(default, list):
        if isinstance(value, (str, int)):
            value = [v.strip() for v in str(value).split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"sweep {key}: expected a list such as [a, b] or a,b; got {value!r}")
        return [int(v) for v in value] if key == "seeds" else [str(v) for v in value]
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"sweep {key}: expected true or false, got {value!r}")
        return value
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"sweep {key}: expected a mapping such as {{i3d: 64}}, got {value!r}")
        return value
    try:
        return type(default)(value)
    except (TypeError, ValueError):
        raise ConfigError(f"sweep {key}: expected {type(default).__name__}, got {value!r}") from None


def main(argv: list[str], default_preset: str = "smoke") -> int:
    """``vid2vid sweep`` and ``experiments/ablations.py``: run or resume, then print where to look."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = list(argv)
    if not any(a.startswith("preset=") for a in args):
        args.insert(0, f"preset={default_preset}")
    cfg, sweep = parse_sweep_args(args)
    try:
        result = run_sweep(cfg, sweep)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = result.path / "comparison" / "comparison.md"
    print(table.read_text() if table.is_file() else "", flush=True)
    for label, err in result.errors.items():
        print(f"trial {label} FAILED: {err}", flush=True)
    print(f"sweep {result.name}: {len(result.trials)} trials done, {len(result.errors)} failed\n"
          f"  Tune experiment : {result.path}\n  MLflow parent   : {result.parent_run_id}\n"
          f"  browse          : mlflow ui --backend-store-uri {result.tracking_uri}", flush=True)
    return 1 if result.errors else 0
