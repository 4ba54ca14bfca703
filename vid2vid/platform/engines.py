"""DeepSpeed engines for a GAN: construction on CPU and GPU, learning rate, rebuild, save/load.

Two engines live in one process when G and D are colocated. On CPU/gloo with ZeRO-1/2 this works
only under two rules (each seen failing otherwise with DeepSpeed 0.19.8), which the train loop must follow:

1. D is forwarded through its engine exactly once per ``d_engine.backward`` (real and fake in one
   batch): ZeRO-2 reduces each gradient once per backward and asserts on a second forward.
2. In G's step D's parameters are frozen and D is called as the bare module,
   ``with frozen(d_engine.module): d_engine.module(fake)`` (:mod:`vid2vid.training.step`): the engine
   wrapper's hooks would try to reduce gradients D does not have (``IndexError`` in ``reduce_ipg_grads``).

Checkpoints come from shared storage, so every engine reads them with ``torch.load(weights_only=True)``
(:class:`WeightsOnlyCheckpointEngine`): tensors, containers and the few DeepSpeed types its ZeRO
optimizer state holds, never arbitrary objects. DeepSpeed's own engine unpickles anything.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

if not torch.cuda.is_available():  # silences DeepSpeed's accelerator auto-detection warning
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

TAG = "state"  # one checkpoint per directory: a fixed tag keeps paths predictable


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds something other than tensors and DeepSpeed's known state types."""


def _deepspeed_safe_globals() -> list[type]:
    """The non-builtin types DeepSpeed 0.19 pickles into a ZeRO-1/2 optimizer state file (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint``); plain data classes, no code runs."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` with DeepSpeed's state types allowed; anything else
    (a pickle that would call a function) is refused with an error naming the file."""
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL \S+", str(exc))
        reason = found.group(0) if found else str(exc).strip().splitlines()[0]
        raise UnsafeCheckpointError(f"checkpoint file {path}: refused to load ({reason}): it holds more than "
                                    "tensors and DeepSpeed's state. Was it written by this code?") from None


def _weights_only_checkpoint_engine(config: Any):
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch.save/torch.load engine with a weights-only load."""

        def load(self, path: str, map_location=None):
            return load_weights_only(path, map_location)

    return WeightsOnlyCheckpointEngine(config)


def _on_gpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() != "cpu"


def deepspeed_config(train_cfg: Any, world_size_of_group: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config dict of one engine data-parallel over ``world_size_of_group`` ranks."""
    c = train_cfg
    if c.zero_stage not in (0, 1, 2):
        raise ValueError(f"train.zero_stage: must be 0, 1 or 2, got {c.zero_stage} "
                         "(stage 3 partitions parameters, which the G/D hand-off does not support)")
    if world_size_of_group < 1:
        raise ValueError(f"world_size_of_group must be >= 1, got {world_size_of_group}")
    if c.precision == "bf16" and not on_gpu:
        raise ValueError("train.precision=bf16 needs a GPU; use precision=auto (fp32 on CPU) or fp32")
    return {
        "train_micro_batch_size_per_gpu": c.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": c.batch_size * world_size_of_group,
        "gradient_clipping": float(c.grad_clip),
        "zero_optimization": {"stage": c.zero_stage},
        # bf16 is torch autocast (the same as forward_precision's, which covers what runs outside
        # the engines: bare D in G's step, the encoder, the objective), not DeepSpeed's bf16 mode:
        # that one casts the module's weights, so every input and everything outside the engine
        # (VGG, warping, the other side's frames) would have to be cast to match, and Adam would step
        # bf16 weights. Autocast keeps fp32 weights and Adam states; no module is listed as
        # lower-precision safe, so gradients are all-reduced in fp32 too.
        "torch_autocast": {"enabled": uses_bf16_autocast(c, on_gpu), "dtype": "bfloat16",
                           "lower_precision_safe_modules": []},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def uses_bf16_autocast(train_cfg: Any, on_gpu: bool) -> bool:
    """bf16 autocast on a GPU unless ``train.precision=fp32``; never on CPU (slower than fp32 there)."""
    return on_gpu and train_cfg.precision in ("auto", "bf16")


def forward_precision(train_cfg: Any, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """A context factory for the forward passes of a step that run outside an engine's own forward
    (which DeepSpeed wraps in its ``torch_autocast`` setting, the same choice)."""
    if train_cfg.precision == "bf16" and device.type != "cuda":
        raise ValueError(f"train.precision=bf16 needs a GPU, but this worker runs on {device}; "
                         "use precision=auto (fp32 on CPU) or fp32")
    if uses_bf16_autocast(train_cfg, device.type == "cuda"):
        return functools.partial(torch.autocast, device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def build_engine(module: nn.Module, train_cfg: Any, lr: float, betas: tuple[float, float],
                 group_mpu: Any = None):
    """Wrap ``module`` in a DeepSpeed engine with Adam over its *trainable* parameters.

    torch.distributed must already be initialised (Ray Train does it). ``group_mpu`` (see
    :func:`vid2vid.platform.placement.make_groups`) restricts data parallelism to one group; ``None``
    means the whole world.
    """
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import groups

    if not dist.is_initialized():
        raise RuntimeError("build_engine: torch.distributed is not initialised (init_process_group first)")
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"build_engine: {type(module).__name__} has no trainable parameters")
    world = group_mpu.get_data_parallel_world_size() if group_mpu is not None else dist.get_world_size()
    config = deepspeed_config(train_cfg, world, _on_gpu())
    # DeepSpeed keeps the mpu in a process-wide global and only ever *sets* it; reset it so an
    # engine built without one does not inherit the group of an earlier engine. Consequence: all
    # engines alive in one process must share one data-parallel group (true in both placements).
    groups.mpu = group_mpu
    # A torch.optim.Adam: DeepSpeed's own Adam would compile a CPU FusedAdam op (~90 s).
    optimizer = torch.optim.Adam(params, lr=lr, betas=tuple(betas))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config,
                                           mpu=group_mpu, dist_init_required=False)
    # Every load of this engine (module, ZeRO shards, optimizer) goes through checkpoint_engine.load.
    engine.checkpoint_engine = _weights_only_checkpoint_engine(engine._config)
    engine._vid2vid_betas = tuple(betas)  # for rebuild_optimizer
    engine._vid2vid_mpu = group_mpu
    return engine


def get_lr(engine) -> float:
    return float(engine.optimizer.param_groups[0]["lr"])


def set_lr(engine, lr: float) -> None:
    """Set the rate of every parameter group (DeepSpeed's ZeRO wrapper forwards to the inner Adam)."""
    for group in engine.optimizer.param_groups:
        group["lr"] = float(lr)


def rebuild_optimizer(engine, train_cfg: Any, lr: float | None = None):
    """A NEW engine over the same module, with Adam over every parameter now trainable.

    Used at the end of spatial fine-tuning (``niter_fix_global``) after the caller has set
    ``requires_grad`` on the coarse scales. The old engine is destroyed first so its ZeRO gradient
    hooks do not keep firing. Adam starts fresh over the parameters that now train (see "Spatial" in
    :mod:`vid2vid.training.schedule`). Weights are untouched.
    """
    module = engine.module
    lr = get_lr(engine) if lr is None else lr
    betas, mpu = engine._vid2vid_betas, engine._vid2vid_mpu
    engine.destroy()
    return build_engine(module, train_cfg, lr, betas, mpu)


def save_engines(directory: str | Path, engines: Mapping[str, Any], client_state: dict[str, Any]) -> Path:
    """Save each engine (weights and optimizer state, ZeRO partitions included) under ``dir/<name>``.

    Every rank of an engine's data-parallel group must call this: each writes its own ZeRO shard.
    ``client_state`` is stored with every engine (the training loop keeps its state in the
    checkpoint manifest instead, see :mod:`vid2vid.checkpoints`).
    """
    directory = Path(directory)
    if not engines:
        raise ValueError("save_engines: no engines given")
    for name, engine in engines.items():
        engine.save_checkpoint(str(directory / name), tag=TAG, client_state={"vid2vid": client_state})
    return directory


def load_engines(directory: str | Path, engines: Mapping[str, Any]) -> dict[str, Any]:
    """Load weights and optimizer states into ``engines`` from ``dir/<name>``; returns ``client_state``."""
    directory = Path(directory)
    state = None
    for name, engine in engines.items():
        path = directory / name
        if not (path / TAG).is_dir():
            found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
            raise FileNotFoundError(f"checkpoint {directory}: no engine {name!r} (expected {path / TAG}); "
                                    f"found {found}")
        load_path, client = engine.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"checkpoint {path}: DeepSpeed could not load tag {TAG!r}")
        state = client.get("vid2vid", {}) if state is None else state
    return state or {}
