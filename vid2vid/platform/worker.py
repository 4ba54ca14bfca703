"""The Ray Train worker loop: one function every TorchTrainer worker runs.

Roles come from the placement plan. In ``colocated`` mode every rank generates, judges and steps both
engines on its own clips (data parallel). In ``split`` mode a generator rank generates and sends its
fake frames to its partner discriminator rank, which returns the gradient of the adversarial losses
with respect to those frames; each side steps its own engine, data parallel within its own group.
Only generator ranks read data; they drive the schedule and tell their partner what to do next.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from vid2vid.checkpoints import (
    decode_rng,
    encode_rng,
    read_rank_state,
    read_state,
    save_config,
    save_weights,
)
from vid2vid.config import Config
from vid2vid.datasets.shards import Clip
from vid2vid.models.objective import LossTerms, Objective
from vid2vid.platform import handoff, startup
from vid2vid.platform.cadence import ReportCadence
from vid2vid.platform.engines import build_engine, forward_precision, rebuild_optimizer, set_lr
from vid2vid.platform.payload import WorkerPayload
from vid2vid.platform.placement import Placement, make_groups, plan_placement
from vid2vid.platform.step import ColocatedStep, SplitGeneratorStep, Step, serve_discriminator_step
from vid2vid.platform.tracking import CommittedMetrics
from vid2vid.training.schedule import EpochPlan, ScheduleState, plan_epoch
from vid2vid.training.sides import initial_coarse_frozen, prepare_sides

log = logging.getLogger("vid2vid.train")


@dataclass
class WorkerContext:
    cfg: Config
    rank: int
    world: int
    placement: Placement
    device: torch.device
    engines: dict[str, Any]
    objective: Objective
    mpu: Any
    precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # bf16 autocast on GPU
    rng: torch.Generator | None = None  # phi_I / phi_V draws of a generator rank; saved in every checkpoint
    clip_len: int | None = None  # frames per prepared clip (the schedule's cap), from the manifest
    last_clip: Clip | None = None  # for the closing sample video
    last_step: int = 0
    fault_hook: Callable[[int], None] | None = None  # tests only: may kill the process before a step
    fit_time: float | None = None  # when the driver called fit(): startup/* metrics are measured from it
    restored_checksum: float | None = None  # sum |w| of G after a resume, reported once (tests check it)
    generator_group: Any = None  # the generator ranks' process group: they agree on when to report
    take_step: Step | None = None  # a generator rank's step, colocated or split


@dataclass
class Reporting:
    """What a generator rank remembers between steps about reporting and checkpoints."""

    cadence: ReportCadence
    tracker: CommittedMetrics | None
    checkpointed: int  # the step of the latest checkpoint (the one resumed from, or none)
    latest: dict[str, float] = field(default_factory=dict)  # the last step's: checkpoints and the end carry them


# --- set-up -----------------------------------------------------------------------------------------

def build_engines(cfg: Config, g: Any, d: Any, mpu: Any) -> dict[str, Any]:
    betas = (cfg.train.beta1, cfg.train.beta2)
    engines: dict[str, Any] = {}
    if g is not None:
        engines["generator"] = build_engine(g, cfg.train, cfg.train.lr, betas, mpu)
    if d is not None:
        engines["discriminator"] = build_engine(d, cfg.train, cfg.train.lr, betas, mpu)
    return engines


def make_step(wc: WorkerContext) -> Step | None:
    if "generator" not in wc.engines:
        return None  # a discriminator rank serves its partner instead (discriminator_loop)
    if wc.placement.mode == "split":
        return SplitGeneratorStep(wc.engines, wc.objective, wc.cfg.model, wc.rng, wc.placement.partner(wc.rank),
                                  wc.device, wc.precision)
    return ColocatedStep(wc.engines, wc.objective, wc.cfg.model, wc.rng, wc.precision)


def setup(cfg: Config, resume_dir: str | None = None) -> WorkerContext:
    """Build this rank's engines; ``resume_dir`` is the checkpoint a resumed run continues from."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    placement = plan_placement(world, cfg.train.gpus_per_worker if cfg.train.use_gpu else 0, cfg.train.placement)
    groups = make_groups(placement)
    role = placement.role(rank)
    if resume_dir is None:
        frozen_now, warm = initial_coarse_frozen(cfg), cfg.train.warm_start
    else:  # a checkpoint's own weights win over any warm start
        frozen_now, warm = bool(read_state(resume_dir).get("coarse_frozen", False)), None
    g, d = prepare_sides(cfg, role, device, frozen_now, warm, log_rank=rank == min(placement.group_ranks(rank)))
    rng = torch.Generator().manual_seed(cfg.train.seed + 7919 * rank) if g is not None else None
    wc = WorkerContext(cfg, rank, world, placement, device, build_engines(cfg, g, d, groups["mpu"]),
                       Objective(cfg.model).to(device), groups["mpu"], forward_precision(cfg.train, device), rng,
                       generator_group=groups["generator"])
    wc.take_step = make_step(wc)
    return wc


def restore(wc: WorkerContext, resume_dir: str | None) -> ScheduleState:
    """Weights, Adam states, schedule, data position and phi draws of the checkpoint (a fresh state
    without one)."""
    from vid2vid.platform.checkpointer import read_checkpoint

    if resume_dir is None:
        return ScheduleState(coarse_frozen=initial_coarse_frozen(wc.cfg))
    state = ScheduleState.from_dict(read_checkpoint(resume_dir, wc.engines))
    if wc.rng is not None:
        saved = read_rank_state(resume_dir, wc.rank)
        if saved is None:
            log.warning("rank %d: checkpoint %s predates saved phi_I/phi_V generators; the draws restart from "
                        "the seed", wc.rank, resume_dir)
        else:
            decode_rng(saved["rng"], wc.rng)
    if "generator" in wc.engines:
        wc.restored_checksum = float(sum(p.detach().abs().sum() for p in wc.engines["generator"].module.parameters()))
    log.info("rank %d resumed at epoch %d step %d (batch %d of the epoch)", wc.rank, state.epoch, state.step,
             state.batch_in_epoch)
    return state


# --- reports and checkpoints ------------------------------------------------------------------------

def save(wc: WorkerContext, state: ScheduleState, metrics: dict[str, float]) -> None:
    """Every rank writes what it owns into a local directory and reports it; Ray merges them."""
    import ray.train

    from vid2vid.platform.checkpointer import write_checkpoint

    rank_state = None if wc.rng is None else {"rng": encode_rng(wc.rng)}
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, wc.engines, state.to_dict(), all_engines=["generator", "discriminator"],
                         rank_state=rank_state)
        for name, engine in wc.engines.items():  # plain weights, once per side (ZeRO-1/2 keep full weights)
            if wc.rank == min(wc.placement.group_ranks(wc.rank)):
                save_weights(tmp, name, engine.module)
        if wc.rank == 0:
            save_config(tmp, wc.cfg)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def report(wc: WorkerContext, state: ScheduleState, metrics: dict[str, float], checkpoint: bool) -> None:
    import ray.train

    if checkpoint:
        save(wc, state, metrics)
    else:
        ray.train.report(metrics)


def checkpoint_due(cfg: Config, step: int) -> bool:
    """Whether the step that brings the count to ``step`` ends with a checkpoint."""
    every = cfg.train.checkpoint_every
    return (every > 0 and step % every == 0) or (cfg.train.max_steps > 0 and step == cfg.train.max_steps)


def max_steps_reached(cfg: Config, state: ScheduleState) -> bool:
    return cfg.train.max_steps > 0 and state.step >= cfg.train.max_steps


def report_cadence(wc: WorkerContext) -> ReportCadence:
    """The driver's progress lines are printed from Ray's reports: asking for them more often asks for
    reports more often too."""
    every_s = min(wc.cfg.train.report_every_s, wc.cfg.train.progress_every_s)
    return ReportCadence(every_s, wc.generator_group, wc.device)


def publish(wc: WorkerContext, state: ScheduleState, metrics: dict[str, float], order: handoff.Control,
            reporting: Reporting) -> None:
    """A step's metrics: to Ray when the cadence says so (with its checkpoint), to MLflow once committed."""
    reporting.latest = metrics
    if order.report:
        report(wc, state, metrics, order.checkpoint)
    if order.checkpoint:
        reporting.checkpointed = state.step
    if reporting.tracker is not None:
        reporting.tracker.buffer(metrics, state.step, committed=order.checkpoint)


def checkpoint_between_steps(wc: WorkerContext, state: ScheduleState, reporting: Reporting,
                             lr_factor: float) -> None:
    """A checkpoint between steps (an epoch's end, the run's end), reported with the last step's metrics
    so Ray's result holds the final losses; the D partner of a split rank reports its own."""
    wc.take_step.tell_partner(handoff.Control(handoff.CHECKPOINT, state.epoch, state.step, True, lr_factor))
    report(wc, state, {**reporting.latest, "step": state.step, "epoch": state.epoch}, checkpoint=True)
    if reporting.tracker is not None:
        reporting.tracker.commit()  # as after a step's checkpoint: a redone epoch never logs twice
    reporting.checkpointed = state.step


# --- the generator ranks' loop ----------------------------------------------------------------------

def total_epochs(cfg: Config) -> int:
    return cfg.train.niter + cfg.train.niter_decay


def begin_epoch(wc: WorkerContext, state: ScheduleState) -> EpochPlan:
    """The schedule's plan for ``state.epoch``, applied to this rank's engines.

    Learning-rate decay on every engine this rank holds (G, D_I and all D_V share the D engine), and
    the spatial schedule: when the plan's frozen state differs from the one G's engine was built with
    (``state.coarse_frozen``, restored from the checkpoint on a resume), set it and build a fresh
    optimizer over the parameters that now train.
    """
    plan = plan_epoch(state.epoch, wc.cfg.train, wc.clip_len)
    state.clip_len = plan.clip_len
    g = wc.engines.get("generator")
    if g is not None and wc.cfg.model.n_scales_spatial > 1 and plan.coarse_frozen != state.coarse_frozen:
        g.module.generator.freeze_coarse_scales(plan.coarse_frozen)
        wc.engines["generator"] = rebuild_optimizer(g, wc.cfg.train)
    state.coarse_frozen = plan.coarse_frozen
    for engine in wc.engines.values():
        set_lr(engine, wc.cfg.train.lr * plan.lr_factor)
    return plan


def unseen_batches(wc: WorkerContext, shard: Any, state: ScheduleState) -> Iterator[tuple[int, Any]]:
    """This epoch's batches (with their index in the epoch), skipping those consumed before the
    checkpoint a resumed run started from."""
    batches = shard.iter_torch_batches(batch_size=wc.cfg.train.batch_size, drop_last=True)
    for index, batch in enumerate(batches):
        if index >= state.batch_in_epoch:
            yield index, batch


def step_metrics(wc: WorkerContext, state: ScheduleState, lr: float, g_terms: LossTerms | None,
                 d_terms: LossTerms | None, frames: int, seconds: float) -> dict[str, float]:
    m = {"step": state.step, "epoch": state.epoch, "clip_len": state.clip_len, "lr": lr,
         "coarse_frozen": float(state.coarse_frozen),
         "frames_per_s": frames / max(seconds, 1e-9), "step_time_s": seconds}
    if g_terms is not None:
        m.update(g_terms.scalars("G/"))
    if d_terms is not None:
        m.update(d_terms.scalars("D/"))
    if wc.device.type == "cuda":
        m["gpu_mem_gb"] = torch.cuda.max_memory_allocated(wc.device) / 2**30
    return m


def train_step(wc: WorkerContext, state: ScheduleState, plan: EpochPlan, index: int, batch: Any,
               reporting: Reporting) -> None:
    """One step on one batch: take it, count it, report it."""
    if wc.fault_hook is not None:
        wc.fault_hook(state.step)
    clip = Clip.from_batch(batch).to(wc.device)
    startup.mark("first_batch")
    n = min(plan.clip_len, clip.num_frames)
    t0 = time.perf_counter()
    checkpoint = checkpoint_due(wc.cfg, state.step + 1)
    order = handoff.Control(handoff.STEP, state.epoch, state.step, checkpoint, plan.lr_factor,
                            reporting.cadence.due(checkpoint))
    result = wc.take_step(clip, n, order)
    seconds = time.perf_counter() - t0
    state.step += 1
    state.batch_in_epoch = index + 1
    wc.last_clip, wc.last_step = clip, state.step
    metrics = step_metrics(wc, state, wc.cfg.train.lr * plan.lr_factor, result.generator, result.discriminator,
                           result.frames, seconds)
    publish(wc, state, {**metrics, **generator_rank_metrics(wc, clip, seconds)}, order, reporting)


def generator_rank_metrics(wc: WorkerContext, clip: Clip, seconds: float) -> dict[str, float]:
    """Which clip the step read, and what a process reports once: the restored weights' checksum after
    a resume, its startup durations with its first step."""
    m = {}
    if wc.restored_checksum is not None:
        m["restored/g_weight_abs_sum"], wc.restored_checksum = wc.restored_checksum, None
    m["clip_index"] = float(clip.clip_index[0]) if clip.clip_index is not None else -1.0
    m.update(startup.first_step_metrics(wc.fit_time, seconds))
    return m


def finish(wc: WorkerContext, state: ScheduleState, reporting: Reporting) -> ScheduleState:
    """The run's end: its last steps, weights and metrics are committed too; the partner stops."""
    if state.step > reporting.checkpointed:
        checkpoint_between_steps(wc, state, reporting, 0.0)
    if reporting.tracker is not None:
        reporting.tracker.flush()
    wc.take_step.tell_partner(handoff.Control(handoff.STOP, state.epoch, state.step, False, 0.0))
    return state


def generator_loop(wc: WorkerContext, state: ScheduleState, tracker: CommittedMetrics | None) -> ScheduleState:
    """Generator ranks (and colocated ranks): read clips, step, report; drive the D partner if split."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    reporting = Reporting(report_cadence(wc), tracker, checkpointed=state.step)
    while state.epoch < total_epochs(wc.cfg):
        plan = begin_epoch(wc, state)
        for index, batch in unseen_batches(wc, shard, state):
            train_step(wc, state, plan, index, batch, reporting)
            if max_steps_reached(wc.cfg, state):
                return finish(wc, state, reporting)
        state.epoch += 1
        state.batch_in_epoch = 0
        if wc.cfg.train.checkpoint_every == 0:
            checkpoint_between_steps(wc, state, reporting, plan.lr_factor)
    return finish(wc, state, reporting)


# --- the discriminator ranks' loop (split placement) ------------------------------------------------

def discriminator_loop(wc: WorkerContext, state: ScheduleState) -> ScheduleState:
    """Discriminator ranks of the split placement: serve the partner G rank until it says stop."""
    import ray.train

    ray.train.get_dataset_shard("train")  # a barrier over all ranks in Ray Train; D reads no data itself
    partner = wc.placement.partner(wc.rank)
    d = wc.engines["discriminator"]
    current_epoch = -1
    while True:
        control = handoff.recv_control(partner, wc.device)
        if control.action == handoff.STOP:
            return state
        if control.action == handoff.CHECKPOINT:  # the partner finished an epoch
            state.epoch, state.step, state.batch_in_epoch = control.epoch, control.step, 0
            report(wc, state, {"step": state.step, "epoch": state.epoch}, checkpoint=True)
            continue
        if control.epoch != current_epoch:
            set_lr(d, wc.cfg.train.lr * control.lr_factor)
            current_epoch = control.epoch
        t0 = time.perf_counter()
        d_terms = serve_discriminator_step(d, wc.objective, partner, wc.device, wc.precision)
        state.epoch, state.step = control.epoch, control.step + 1
        metrics = step_metrics(wc, state, d.optimizer.param_groups[0]["lr"], None, d_terms, 0,
                               time.perf_counter() - t0)
        if control.report:  # its G partner's cadence decided (every rank must make the same reports)
            report(wc, state, metrics, control.checkpoint)


# --- entry point ------------------------------------------------------------------------------------

def train_loop_per_worker(payload: WorkerPayload) -> None:
    """Entry point given to ``TorchTrainer`` (through ``trainer.train_worker``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import ray.train

    cfg = payload.train_config()
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as resume_dir:
        wc = setup(cfg, resume_dir)
        startup.mark("engines_built")
        state = restore(wc, resume_dir)
    wc.fit_time, wc.clip_len, wc.fault_hook = payload.fit_time, payload.clip_len, payload.fault_hook
    tracker = None
    if wc.rank == 0 and payload.tracking:  # the driver's run, also when it could not be created yet
        from vid2vid.platform.tracking import Tracker

        tracker = CommittedMetrics(Tracker.join(payload.tracking, writer=f"rank{wc.rank}"))
    if wc.placement.role(wc.rank) == "discriminator":
        discriminator_loop(wc, state)
    else:
        generator_loop(wc, state, tracker)
    if tracker is not None:
        from vid2vid.platform.samples import log_sample_video

        log_sample_video(wc, tracker, payload.sample_dir or tempfile.mkdtemp())
        tracker.end("FINISHED")

