"""Ablation sweeps: trial configs, the comparison table, and one real 4-variant Tune sweep whose driver is
killed after the first trial and restored (the acceptance test of the sweep issue)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vid2vid.config import ConfigError, load_config
from vid2vid.models.adversarial import DiscriminatorSide
from vid2vid.models.vid2vid import GeneratorSide
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
)
from vid2vid.platform.sweep import (
    VARIANTS,
    SweepConfig,
    TrialSpec,
    concurrent_trials,
    parameter_counts,
    parse_sweep_args,
    read_attempts,
    trial_config,
    trial_specs,
)

REPO = Path(__file__).resolve().parent.parent
# The sub-modules each ablation removes (and nothing else): generator side "G", discriminator side "D".
REMOVED = {
    "full": {"G": set(), "D": set()},
    "no_fg_bg_prior": {"G": {"generator.scales.0.fg_branch", "generator.scales.0.fg_enc", "generator.scales.0.fg_head"},
                       "D": set()},
    "no_video_discriminator": {"G": set(), "D": {"video.temporal"}},
    "no_flow_warping": {"G": {"generator.scales.0.flow_branch", "generator.scales.0.flow_head",
                              "generator.scales.0.mask_head"}, "D": set()},
}
TINY = ["preset=smoke", "data.synthetic_sequences=2", "data.synthetic_frames=8", "data.clip_len=4",
        "train.max_steps=2"]


def _missing_modules(full: set[str], ablated: set[str], depth: int) -> set[str]:
    """Module prefixes (first ``depth`` name parts) of the tensors the ablated model lacks."""
    assert ablated <= full, f"the ablated model has tensors the full one lacks: {sorted(ablated - full)[:5]}"
    return {".".join(k.split(".")[:depth]) for k in full - ablated}


# ------------------------------------------------------------------------------------------------
# Configs, no Ray


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_builds_model_without_exactly_its_component(variant):
    base = load_config(["preset=smoke"])
    cfg = trial_config(base, TrialSpec(variant, 3))
    assert cfg.train.seed == 3 and base.train.seed == 0  # the base config is not modified
    full_g, full_d = GeneratorSide(base.model).state_dict(), DiscriminatorSide(base.model).state_dict()
    g, d = GeneratorSide(cfg.model).state_dict(), DiscriminatorSide(cfg.model).state_dict()
    assert _missing_modules(set(full_g), set(g), 4) == REMOVED[variant]["G"]
    assert _missing_modules(set(full_d), set(d), 2) == REMOVED[variant]["D"]
    counts = parameter_counts(cfg)
    assert counts["params/generator"] == sum(v.numel() for v in g.values())
    assert counts["params/discriminator"] == sum(v.numel() for v in d.values())


def test_trial_specs_cross_variants_seeds_and_grid():
    base = load_config(["preset=smoke"])
    sweep = SweepConfig(variants=["full", "no_flow_warping"], seeds=[0, 1, 2], grid={"model.ngf": [8, 16]})
    specs = trial_specs(base, sweep)
    assert len(specs) == 2 * 3 * 2 and len({s.label for s in specs}) == 12
    s = next(s for s in specs if s.variant == "no_flow_warping" and s.seed == 2 and dict(s.grid)["model.ngf"] == 8)
    cfg = trial_config(base, s)
    assert (cfg.model.ngf, cfg.model.flow_warping, cfg.model.fg_bg_prior, cfg.train.seed) == (8, False, True, 2)
    assert s.group == "no_flow_warping model.ngf=8" and s.label == "no_flow_warping-ngf8-s2"


def test_bad_variant_and_grid_key_fail_before_ray_with_the_name():
    base = load_config(["preset=smoke"])
    with pytest.raises(ConfigError, match="no_flow.*valid variants.*no_flow_warping"):
        trial_specs(base, SweepConfig(variants=["no_flow"]))
    with pytest.raises(ConfigError, match="model.ngff"):
        trial_specs(base, SweepConfig(grid={"model.ngff": [8]}))
    with pytest.raises(ConfigError, match="grid.model.ngf: expected a non-empty list"):
        parse_sweep_args(["grid.model.ngf=8"])


def test_parse_sweep_args_splits_sweep_grid_and_config():
    cfg, sweep = parse_sweep_args(["preset=smoke", "variants=full,no_video_discriminator", "seeds=[0,5]",
                                   "grid.train.lr=[1e-4, 2e-4]", "model.ngf=8", "name=t2", "max_failures=3",
                                   "sweep.evaluate=false", "eval_input_sizes={i3d: 64}"])
    assert sweep.variants == ["full", "no_video_discriminator"] and sweep.seeds == [0, 5]
    assert sweep.grid == {"train.lr": [1e-4, 2e-4]} and sweep.name == "t2" and sweep.max_failures == 3
    assert sweep.evaluate is False and sweep.eval_input_sizes == {"i3d": 64}
    assert cfg.name == "smoke" and cfg.model.ngf == 8


def test_concurrent_trials_from_per_trial_resources():
    cfg = load_config(["preset=smoke"])  # 1 worker x 0.5 CPU; + 0.5 trial actor + 1 CPU for data = 2 per trial
    assert concurrent_trials(cfg, SweepConfig(), {"CPU": 2.0}) == 1
    assert concurrent_trials(cfg, SweepConfig(), {"CPU": 9.0}) == 4
    assert concurrent_trials(cfg, SweepConfig(max_concurrent_trials=3), {"CPU": 2.0}) == 3
    gpu = load_config(["preset=smoke", "train.use_gpu=true", "train.num_workers=2", "train.gpus_per_worker=1"])
    assert concurrent_trials(gpu, SweepConfig(), {"CPU": 64.0, "GPU": 8.0}) == 4


# ------------------------------------------------------------------------------------------------
# Comparison table and plots, no Ray


def _records() -> list[TrialRecord]:
    rows = [("full", 0, 10.0, 30.0), ("full", 1, 12.0, 34.0), ("full", 2, 17.0, 29.0),
            ("no_flow_warping", 0, 20.0, 40.0), ("no_flow_warping", 1, 24.0, 44.0)]
    return [TrialRecord(v, v, s, f"{v}-s{s}", f"run{i}", {"eval/fid_i3d": a, "G/total": b, "G/vgg": 1.0,
                                                           "params/generator": 1000.0})
            for i, (v, s, a, b) in enumerate(rows)]


def test_summary_mean_and_sample_std_match_numpy(tmp_path):
    records = _records()
    metrics = headline_metrics(metric_columns(records))
    assert metrics == ["eval/fid_i3d", "G/total", "params/generator"]  # eval first; G/vgg only in trials.csv
    summaries = summarize(records, metrics)
    assert [s.group for s in summaries] == ["full", "no_flow_warping"]
    full = summaries[0]
    assert full.seeds == [0, 1, 2]
    assert math.isclose(full.mean["eval/fid_i3d"], np.mean([10, 12, 17]))
    assert math.isclose(full.std["eval/fid_i3d"], np.std([10, 12, 17], ddof=1))
    one = summarize(records[:1], metrics)[0]
    assert one.std["eval/fid_i3d"] is None  # one seed: spread unknown, not 0
    md = comparison_markdown(summaries, metrics, "t")
    assert f"| full | 3 | 13 ± {np.std([10, 12, 17], ddof=1):.4g} |" in md
    assert "| no_flow_warping | 2 | 22 ± 2.828 | 42 ± 2.828 | 1000 ± 0 |" in md
    csv_text = write_comparison_csv(summaries, metrics, tmp_path / "c.csv").read_text().splitlines()
    assert csv_text[0].startswith("group,num_seeds,seeds,eval/fid_i3d_mean,eval/fid_i3d_std,G/total_mean")
    assert csv_text[1].startswith("full,3,0 1 2,13.0,")


def test_comparison_shows_intervals_and_marks_differences_they_do_not_support(tmp_path):
    """Each trial logs eval/fid_i3d with /ci95_low, /ci95_high and /clips. Against the reference (first
    group), overlapping intervals are marked ≈; disjoint ones are not."""
    def rec(group, seed, value, low, high):
        return TrialRecord(group, group, seed, f"{group}-s{seed}", None,
                           {"eval/fid_i3d": value, "eval/fid_i3d/ci95_low": low, "eval/fid_i3d/ci95_high": high,
                            "eval/fid_i3d/clips": 500.0, "G/total": 1.0})

    records = [rec("full", 0, 10.0, 8.0, 12.0), rec("full", 1, 12.0, 10.0, 14.0),
               rec("no_flow_warping", 0, 13.0, 11.0, 15.0),  # overlaps full's [9, 13]
               rec("no_video_discriminator", 0, 30.0, 27.0, 33.0)]  # clear of it
    metrics = headline_metrics(metric_columns(records))
    assert metrics == ["eval/fid_i3d", "G/total"], "the companions are not columns of their own"
    summaries = summarize(records, metrics)
    assert (summaries[0].low["eval/fid_i3d"], summaries[0].high["eval/fid_i3d"]) == (9.0, 13.0)
    md = comparison_markdown(summaries, metrics)
    assert "| full | 2 | 11 ± 1.414 [9, 13] n=500 |" in md
    assert "| no_flow_warping | 1 | ≈ 13 [11, 15] n=500 |" in md
    assert "| no_video_discriminator | 1 | 30 [27, 33] n=500 |" in md
    assert "≈: the interval overlaps the reference's (full)" in md
    rows = write_comparison_csv(summaries, metrics, tmp_path / "c.csv").read_text().splitlines()
    assert rows[0].startswith("group,num_seeds,seeds,eval/fid_i3d_mean,eval/fid_i3d_std,eval/fid_i3d_ci95_low,"
                              "eval/fid_i3d_ci95_high,eval/fid_i3d_clips,eval/fid_i3d_vs_reference,G/total_mean")
    assert [r.split(",")[8] for r in rows[1:]] == ["", "not supported", "supported"]


def test_plots_are_png(tmp_path):
    records = _records()
    a = plot_metrics(records, ["eval/fid_i3d", "G/total"], tmp_path / "m.png")
    b = plot_loss_curves([LossHistory("full-s0", "full", {"G/total": [(1, 3.0), (2, 2.0)]})], tmp_path / "l.png")
    for p in (a, b):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


# ------------------------------------------------------------------------------------------------
# The acceptance test: 4 variants x 1 seed, driver killed after the first trial, restored in-process


def _terminated(sweep_dir: Path) -> list[str]:
    """Trial ids Tune's saved experiment state lists as TERMINATED (what a restore will not re-run)."""
    states = sorted(sweep_dir.glob("experiment_state-*.json"))
    if not states:
        return []
    try:
        data = json.loads(states[-1].read_text())
    except json.JSONDecodeError:  # caught mid-write
        return []
    trials = [json.loads(t[0]) for t in data.get("trial_data", [])]
    return [t["trial_id"] for t in trials if t.get("status") == "TERMINATED"]


@pytest.fixture(scope="module")
def killed_and_restored_sweep(ray_cluster, tmp_path_factory):
    from vid2vid.datasets.prepare import prepare
    from vid2vid.eval.feature_nets import save_random_weights
    from vid2vid.platform.sweep import run_sweep

    root = tmp_path_factory.mktemp("sweep")
    i3d = save_random_weights("i3d", root / "i3d_random.pt")
    args = [*TINY, f"data.out={root / 'shards'}", f"train.run_dir={root / 'runs'}", "train.experiment=sweep-test",
            f"eval.i3d_weights={i3d}", "eval.allow_random_weights=true", "eval_input_sizes={i3d: 64, fvd: 64}",
            "name=abl", "max_failures=1"]
    cfg, sweep = parse_sweep_args(args)
    prepare(cfg.data)
    sweep_dir = root / "runs" / "sweeps" / "abl"
    log = root / "driver.log"
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address, DS_ACCELERATOR="cpu")
    with log.open("w") as out:
        driver = subprocess.Popen([sys.executable, str(REPO / "experiments" / "ablations.py"), *args], cwd=root,
                                  env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 420
        while not _terminated(sweep_dir):
            if driver.poll() is not None:
                pytest.fail(f"sweep driver exited ({driver.returncode}) before a trial finished:\n"
                            + log.read_text()[-4000:])
            if time.monotonic() > deadline:
                pytest.fail("no trial finished within 420 s:\n" + log.read_text()[-4000:])
            time.sleep(1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver dies as a lost head process would
        driver.wait()
    killed_after = {a["label"] for a in read_attempts(sweep_dir) if a["event"] == "finish"}
    result = run_sweep(cfg, sweep)  # same name: Tuner.restore
    return result, killed_after, cfg


def test_sweep_restored_after_driver_kill_does_not_rerun_finished_trials(killed_and_restored_sweep):
    result, killed_after, _ = killed_and_restored_sweep
    assert len(killed_after) >= 1
    assert result.errors == {}
    labels = {t.label for t in result.trials}
    assert labels == {f"{v}-s0" for v in VARIANTS}
    attempts = read_attempts(result.path)
    for label in labels:
        finishes = [a for a in attempts if a["label"] == label and a["event"] == "finish"]
        assert len(finishes) == 1, f"{label} finished {len(finishes)} times"
    for label in killed_after:  # finished before the kill: started exactly once, never again
        assert sum(a["label"] == label and a["event"] == "start" for a in attempts) == 1
    assert killed_after < labels  # the kill really interrupted the sweep


def test_sweep_mlflow_parent_children_params_and_metrics(killed_and_restored_sweep):
    from mlflow.tracking import MlflowClient

    result, _, cfg = killed_and_restored_sweep
    client = MlflowClient(tracking_uri=result.tracking_uri)
    exp = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep/role") == "parent"]
    assert len(parents) == 1 and parents[0].info.run_id == result.parent_run_id
    assert parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert len(children) == 4 and len(runs) == 5
    by_variant = {r.data.params["variant"]: r for r in children}
    assert set(by_variant) == set(VARIANTS)
    for variant, run in by_variant.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["variant"] == variant and run.data.params["seed"] == "0"
        m = run.data.metrics
        want = parameter_counts(trial_config(cfg, TrialSpec(variant, 0)))
        assert {k: int(m[k]) for k in want} == want
        assert "random_weights/eval/fid_i3d" in m and math.isfinite(m["random_weights/eval/fid_i3d"])
        assert "eval/warping_error" in m and "G/total" in m
    full = by_variant["full"].data.metrics
    assert by_variant["no_fg_bg_prior"].data.metrics["params/generator"] < full["params/generator"]
    assert by_variant["no_flow_warping"].data.metrics["params/generator"] < full["params/generator"]
    assert by_variant["no_video_discriminator"].data.metrics["params/discriminator"] < full["params/discriminator"]
    assert by_variant["no_video_discriminator"].data.metrics["params/generator"] == full["params/generator"]
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "comparison")}
    assert artifacts == {f"comparison/{n}" for n in ("trials.csv", "comparison.csv", "comparison.md",
                                                    "metrics.png", "loss_curves.png")}
    md = (result.path / "comparison" / "comparison.md").read_text()
    for variant in VARIANTS:
        assert f"| {variant} | 1 |" in md


def test_each_trained_variant_lacks_exactly_its_component(killed_and_restored_sweep):
    from mlflow.tracking import MlflowClient

    result, _, _ = killed_and_restored_sweep
    client = MlflowClient(tracking_uri=result.tracking_uri)
    keys = {}
    for t in result.trials:
        ckpt = Path(client.get_run(t.run_id).data.tags["checkpoint"])
        keys[t.variant] = {side: set(torch.load(ckpt / side / "weights.pt", weights_only=True))
                           for side in ("generator", "discriminator")}
    for variant, sides in keys.items():
        assert _missing_modules(keys["full"]["generator"], sides["generator"], 4) == REMOVED[variant]["G"]
        assert _missing_modules(keys["full"]["discriminator"], sides["discriminator"], 2) == REMOVED[variant]["D"]
