"""The Ray Train worker loop: one function every TorchTrainer worker runs.

Roles come from the placement plan. In ``colocated`` mode every rank generates, judges and steps both
engines on its own clips (data parallel). In ``split`` mode a generator rank generates and sends its
fake frames to its partner discriminator rank, which returns the gradient of the adversarial losses
with respect to those frames; each side steps its own engine, data parallel within its own group.
Only generator ranks read data; they drive the schedule and tell their partner what to do next.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vid2vid.checkpoints import (
    decode_rng,
    encode_rng,
    load_matching,
    read_rank_state,
    read_state,
    save_config,
    save_weights,
)
from vid2vid.config import Config, apply_mapping
from vid2vid.datasets.shards import Clip
from vid2vid.models.adversarial import DiscriminatorSide
from vid2vid.models.objective import LossTerms, Objective
from vid2vid.models.vid2vid import GeneratorSide
from vid2vid.platform import handoff, startup
from vid2vid.platform.cadence import ReportCadence
from vid2vid.platform.engines import build_engine, forward_precision, frozen, rebuild_optimizer, set_lr
from vid2vid.platform.placement import Placement, make_groups, plan_placement
from vid2vid.platform.schedule import EpochPlan, ScheduleState, plan_epoch
from vid2vid.platform.step import adversarial_inputs, colocated_step, generate_for_training

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
    fail_at_steps: tuple[int, ...] = ()
    fail_marker: str | None = None
    fit_time: float | None = None  # when the driver called fit(): startup/* metrics are measured from it
    restored_checksum: float | None = None  # sum |w| of G after a resume, reported once (tests check it)
    generator_group: Any = None  # the generator ranks' process group: they agree on when to report


def config_from_dict(d: dict[str, Any]) -> Config:
    return apply_mapping(Config(), d)


def build_sides(cfg: Config, role: str, device: torch.device) -> tuple[GeneratorSide | None, DiscriminatorSide | None]:
    """Both sides seeded the same way on every rank and in every placement, so G and D start from the
    same weights whichever mode runs them."""
    torch.manual_seed(cfg.train.seed)
    g = GeneratorSide(cfg.model).to(device)
    torch.manual_seed(cfg.train.seed + 1)
    d = DiscriminatorSide(cfg.model).to(device)
    return (g if role in ("both", "generator") else None), (d if role in ("both", "discriminator") else None)


def initial_coarse_frozen(cfg: Config) -> bool:
    """Whether a fresh run starts with its coarse scales frozen (epoch 0 of the schedule)."""
    return plan_epoch(0, cfg.train).coarse_frozen


def prepare_sides(cfg: Config, role: str, device: torch.device, coarse_frozen: bool,
                  warm_start_from: str | None = None, log_rank: bool = True):
    """The modules of this rank, warm-started and frozen as they must be BEFORE the engines exist.

    DeepSpeed's ZeRO-1/2 optimizer copies the trainable weights into its own fp32 partition at
    ``initialize`` and writes that copy back after every step: weights loaded into the module later
    would be undone by the first step. The frozen coarse scales decide which parameters Adam holds,
    so they too are set first (from the checkpoint on a resume, from epoch 0 of the schedule otherwise).
    """
    g, d = build_sides(cfg, role, device)
    if warm_start_from:
        for name, side in (("generator", g), ("discriminator", d)):
            if side is not None:
                matched = load_matching(side, warm_start_from, name)
                if log_rank:
                    log.warning("warm start %s from %s: %d tensors loaded, %d kept as initialised in %s",
                                name, warm_start_from, len(matched.copied), len(matched.new + matched.reshaped),
                                ", ".join(matched.new_modules()) or "none")
    if g is not None:
        g.generator.freeze_coarse_scales(coarse_frozen)
    return g, d


def build_engines(cfg: Config, g: Any, d: Any, mpu: Any) -> dict[str, Any]:
    betas = (cfg.train.beta1, cfg.train.beta2)
    engines: dict[str, Any] = {}
    if g is not None:
        engines["generator"] = build_engine(g, cfg.train, cfg.train.lr, betas, mpu)
    if d is not None:
        engines["discriminator"] = build_engine(d, cfg.train, cfg.train.lr, betas, mpu)
    return engines


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
    return WorkerContext(cfg, rank, world, placement, device, build_engines(cfg, g, d, groups["mpu"]),
                         Objective(cfg.model).to(device), groups["mpu"], forward_precision(cfg.train, device), rng,
                         generator_group=groups["generator"])


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


def _apply_epoch(wc: WorkerContext, plan: EpochPlan, state: ScheduleState) -> None:
    """Learning-rate decay on every engine this rank holds (G, D_I and all D_V share the D engine),
    and the spatial schedule: when the plan's frozen state differs from the one G's engine was built
    with (``state.coarse_frozen``, restored from the checkpoint on a resume), set it and build a fresh
    optimizer over the parameters that now train."""
    g = wc.engines.get("generator")
    if g is not None and wc.cfg.model.n_scales_spatial > 1 and plan.coarse_frozen != state.coarse_frozen:
        g.module.generator.freeze_coarse_scales(plan.coarse_frozen)
        wc.engines["generator"] = rebuild_optimizer(g, wc.cfg.train)
    state.coarse_frozen = plan.coarse_frozen
    for engine in wc.engines.values():
        set_lr(engine, wc.cfg.train.lr * plan.lr_factor)


def _metrics(state: ScheduleState, g_terms: LossTerms | None, d_terms: LossTerms | None, frames: int,
             seconds: float, lr: float, device: torch.device) -> dict[str, float]:
    m = {"step": state.step, "epoch": state.epoch, "clip_len": state.clip_len, "lr": lr,
         "coarse_frozen": float(state.coarse_frozen),
         "frames_per_s": frames / max(seconds, 1e-9), "step_time_s": seconds}
    if g_terms is not None:
        m.update(g_terms.scalars("G/"))
    if d_terms is not None:
        m.update(d_terms.scalars("D/"))
    if device.type == "cuda":
        m["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return m


def _maybe_fail(wc: WorkerContext, state: ScheduleState) -> None:
    """Test hook: the process dies once at each step of ``fail_at_steps``, before taking the step after
    it (the marker file lists the steps it died at, so the restarted worker carries on)."""
    marker = wc.fail_marker
    if state.step not in wc.fail_at_steps or not marker:
        return
    done = json.loads(Path(marker).read_text()) if Path(marker).exists() else []
    if state.step not in done:
        Path(marker).write_text(json.dumps([*done, state.step]))
        os._exit(1)  # a hard kill, as a lost node would be


class CommittedMetrics:
    """Per-step metrics reach MLflow only once a checkpoint covering them is committed.

    A worker that dies redoes the steps after its last committed checkpoint; holding their metrics
    until the next commit means MLflow never shows a step twice (nor a step the model lost).
    """

    def __init__(self, tracker: Any):
        self.tracker = tracker
        self.pending: list[tuple[int, dict[str, float]]] = []

    def buffer(self, metrics: dict[str, float], step: int, committed: bool) -> None:
        self.pending.append((step, metrics))
        if committed:
            self.commit()

    def commit(self) -> None:
        """After a checkpoint was reported: wait until Ray Train has committed it, then log."""
        import ray.train

        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        self.flush()

    def flush(self) -> None:
        for step, metrics in self.pending:
            self.tracker.log_metrics(metrics, step=step)
        self.pending.clear()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tracker, name)


def total_epochs(cfg: Config) -> int:
    return cfg.train.niter + cfg.train.niter_decay


def generator_loop(wc: WorkerContext, state: ScheduleState, tracker: Any) -> ScheduleState:
    """Generator ranks (and colocated ranks): read clips, step, report; drive the D partner if split."""
    import ray.train

    cfg, split = wc.cfg, wc.placement.mode == "split"
    partner = wc.placement.partner(wc.rank)
    shard = ray.train.get_dataset_shard("train")
    rng = wc.rng
    available = wc.clip_len
    done = False
    # The driver's progress lines are printed from Ray's reports: asking for them more often asks for
    # reports more often too.
    every_s = min(cfg.train.report_every_s, cfg.train.progress_every_s)
    cadence = ReportCadence(every_s, wc.generator_group, wc.device)
    latest: dict[str, float] = {}  # the last step's metrics: every checkpoint and the run's end carry them
    checkpointed = state.step  # the step of the latest checkpoint (the one resumed from, or none)
    while state.epoch < total_epochs(cfg) and not done:
        plan = plan_epoch(state.epoch, cfg.train, available)
        state.clip_len = plan.clip_len
        _apply_epoch(wc, plan, state)
        batches = shard.iter_torch_batches(batch_size=cfg.train.batch_size, drop_last=True)
        for index, batch in enumerate(batches):
            if index < state.batch_in_epoch:
                continue  # consumed before the checkpoint we resumed from
            _maybe_fail(wc, state)
            clip = Clip.from_batch(batch).to(wc.device)
            startup.mark("first_batch")
            n = min(plan.clip_len, clip.num_frames)
            t0 = time.perf_counter()
            checkpoint = _checkpoint_due(cfg, state.step + 1)
            to_ray = cadence.due(checkpoint)
            if split:
                handoff.send_control(handoff.Control(handoff.STEP, state.epoch, state.step, checkpoint,
                                                     plan.lr_factor, to_ray), partner, wc.device)
                g_terms, d_terms = split_generator_step(wc, clip, n, rng, partner)
            else:
                result = colocated_step(wc.engines["generator"], wc.engines["discriminator"], wc.objective, cfg.model,
                                        clip, n, rng, precision=wc.precision)
                g_terms, d_terms = result.generator, result.discriminator
            seconds = time.perf_counter() - t0
            state.step += 1
            state.batch_in_epoch = index + 1
            wc.last_clip, wc.last_step = clip, state.step
            metrics = _metrics(state, g_terms, d_terms, clip.labels.shape[0] * n, seconds,
                               cfg.train.lr * plan.lr_factor, wc.device)
            if wc.restored_checksum is not None:
                metrics["restored/g_weight_abs_sum"], wc.restored_checksum = wc.restored_checksum, None
            metrics["clip_index"] = float(clip.clip_index[0]) if clip.clip_index is not None else -1.0
            metrics.update(startup.first_step_metrics(wc.fit_time, seconds))
            latest = metrics
            if to_ray:
                report(wc, state, metrics, checkpoint)
            if checkpoint:
                checkpointed = state.step
            if tracker is not None:
                tracker.buffer(metrics, state.step, committed=checkpoint)
            if cfg.train.max_steps and state.step >= cfg.train.max_steps:
                done = True
                break
        if not done:
            state.epoch += 1
            state.batch_in_epoch = 0
            if cfg.train.checkpoint_every == 0:
                checkpointed = _checkpoint_now(wc, state, latest, tracker, plan.lr_factor)
    if state.step > checkpointed:  # the run's end: its last steps, weights and metrics are committed too
        checkpointed = _checkpoint_now(wc, state, latest, tracker, 0.0)
    if tracker is not None:
        tracker.flush()
    if split:
        handoff.send_control(handoff.Control(handoff.STOP, state.epoch, state.step, False, 0.0), partner, wc.device)
    return state


def _checkpoint_now(wc: WorkerContext, state: ScheduleState, latest: dict[str, float], tracker: Any,
                    lr_factor: float) -> int:
    """A checkpoint between steps (an epoch's end, the run's end), reported with the last step's metrics
    so Ray's result holds the final losses; the D partner of a split rank reports its own."""
    if wc.placement.mode == "split":
        handoff.send_control(handoff.Control(handoff.CHECKPOINT, state.epoch, state.step, True, lr_factor),
                             wc.placement.partner(wc.rank), wc.device)
    report(wc, state, {**latest, "step": state.step, "epoch": state.epoch}, checkpoint=True)
    if tracker is not None:
        tracker.commit()  # as after a step's checkpoint: a redone epoch never logs twice
    return state.step


def _checkpoint_due(cfg: Config, step: int) -> bool:
    every = cfg.train.checkpoint_every
    return (every > 0 and step % every == 0) or (cfg.train.max_steps > 0 and step == cfg.train.max_steps)


def split_generator_step(wc: WorkerContext, clip: Clip, n: int, rng: torch.Generator,
                         partner: int) -> tuple[LossTerms, LossTerms]:
    g, cfg = wc.engines["generator"], wc.cfg.model
    with wc.precision():
        seq = generate_for_training(g, cfg, clip, n)
        adv = adversarial_inputs(cfg, clip, seq, rng)
    handoff.send_adversarial(adv, partner)
    with wc.precision():
        local = wc.objective.generator_local(seq, clip.frames, clip.flow, clip.confidence)
    grads = handoff.recv_tensors(partner, wc.device)
    fakes = [adv.fake] + ([adv.fake_raw] if adv.fake_raw is not None else [])
    # A surrogate whose gradient w.r.t. G's parameters is exactly that of local + adversarial losses:
    # d/dtheta <fake, dL_adv/dfake> = dL_adv/dfake . dfake/dtheta (the chain rule, D's half done remotely).
    surrogate = local.total + sum((f * gr).sum() for f, gr in zip(fakes, grads, strict=True))
    g.backward(surrogate)
    g.step()
    values = handoff.recv_tensors(partner, wc.device)
    g_names, d_names = handoff.adversarial_names(adv, cfg.face_discriminator)
    g_adv = LossTerms(dict(zip(g_names, values[0].unbind(), strict=True)))
    d_terms = LossTerms(dict(zip(d_names, values[1].unbind(), strict=True)))
    return local + g_adv, d_terms


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
        adv = handoff.recv_adversarial(partner, wc.device)
        with frozen(d.module), wc.precision():
            g_adv = wc.objective.generator_adversarial(d.module(adv))
        leaves = [adv.fake] + ([adv.fake_raw] if adv.fake_raw is not None else [])
        grads = torch.autograd.grad(g_adv.total, leaves)
        handoff.send_tensors(list(grads), partner)  # G back-propagates while D takes its own step
        with wc.precision():
            d_terms = wc.objective.discriminator(d(adv.detached()))
        d.backward(d_terms.total)
        d.step()
        handoff.send_tensors([torch.stack(list(g_adv.terms.values())).detach(),
                              torch.stack(list(d_terms.terms.values())).detach()], partner)
        state.epoch, state.step = control.epoch, control.step + 1
        metrics = _metrics(state, None, d_terms, 0, time.perf_counter() - t0, d.optimizer.param_groups[0]["lr"],
                           wc.device)
        if control.report:  # its G partner's cadence decided (every rank must make the same reports)
            report(wc, state, metrics, control.checkpoint)


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Entry point given to ``TorchTrainer``: ``payload = {"config": dict, "run_id": str | None}``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import ray.train

    cfg = config_from_dict(payload["config"])
    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint is not None else contextlib.nullcontext() as resume_dir:
        wc = setup(cfg, resume_dir)
        startup.mark("engines_built")
        state = restore(wc, resume_dir)
    wc.fit_time = payload.get("fit_time")
    wc.clip_len = payload.get("clip_len")
    wc.fail_at_steps, wc.fail_marker = tuple(payload.get("fail_at_steps", ())), payload.get("fail_marker")
    tracker = None
    if wc.rank == 0 and payload.get("tracking"):  # the driver's run, also when it could not be created yet
        from vid2vid.platform.tracking import Tracker

        tracker = CommittedMetrics(Tracker.join(payload["tracking"], writer=f"rank{wc.rank}"))
    if wc.placement.role(wc.rank) == "discriminator":
        discriminator_loop(wc, state)
    else:
        state = generator_loop(wc, state, tracker)
    if tracker is not None:
        from vid2vid.platform.samples import log_sample_video

        log_sample_video(wc, tracker, payload.get("sample_dir") or tempfile.mkdtemp())
        tracker.end("FINISHED")
