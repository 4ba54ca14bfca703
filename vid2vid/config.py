"""The one typed configuration of the platform.

A run is described by :class:`Config` (model, data, train, eval sections). Presets are YAML files
under ``experiments/configs/``; ``key=value`` overrides on the command line address fields by dotted
path (``model.ngf=64``, ``train.lr=1e-4``). Unknown keys and wrong types are errors that name the key
and list the valid ones, so a typo never silently falls back to a default.

This module owns the ``key=value`` syntax of every command: :func:`split_key_values` is the one tokenizer;
config overrides (:func:`parse_overrides`), a command's own options (:func:`parse_command_args`), the
sweep's axes and ``vid2vid evaluate``'s keys are read on top of it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vid2vid.errors import UserError

# Cityscapes labelIds treated as foreground (person, rider, car, truck, bus, train, motorcycle,
# bicycle). The reference code defaults to car (26) only.
CITYSCAPES_FOREGROUND_IDS = (24, 25, 26, 27, 28, 31, 32, 33)

PRESET_DIR = Path(__file__).resolve().parent.parent / "experiments" / "configs"

# Keys that configs no longer have but files written before their removal (a checkpoint's config.json,
# a preset) still hold: skipped there, so old checkpoints load; as an override they are unknown keys.
RETIRED_KEYS = frozenset({"train.sample_every"})  # never read by any code


class ConfigError(UserError, ValueError):
    """A configuration key or value is invalid; the message names the key."""


@dataclass
class ModelConfig:
    # --- input / output ---------------------------------------------------------------------
    label_nc: int = 35  # one-hot label channels; 0 means the input is a dense map of input_nc channels
    input_nc: int = 0  # dense input channels (edges: 1, pose: 6) when label_nc == 0
    use_instance: bool = True  # append an instance-boundary channel to each label frame
    output_nc: int = 3
    n_frames_G: int = 3  # L + 1 label frames; L = n_frames_G - 1 previous frames
    # --- generator ---------------------------------------------------------------------------
    ngf: int = 128
    n_downsample_G: int = 3
    n_blocks: int = 9  # global generator: n_blocks - n_blocks//2 encoder + n_blocks//2 per branch
    n_blocks_local: int = 3
    n_scales_spatial: int = 1  # 1..3 coarse-to-fine scales
    norm: Literal["instance", "batch", "none"] = "instance"
    flow_multiplier: float = 20.0  # flow head output x 20 * 2**scale, in pixels
    # --- ablation switches: off means the component is not built at all --------------------
    fg_bg_prior: bool = True
    video_discriminator: bool = True
    flow_warping: bool = True
    fg_labels: list[int] = field(default_factory=lambda: list(CITYSCAPES_FOREGROUND_IDS))
    # --- multimodal feature encoder E ---------------------------------------------------------
    use_features: bool = False
    feat_num: int = 3
    nef: int = 32
    n_downsample_E: int = 3
    # --- discriminators -----------------------------------------------------------------------
    ndf: int = 64
    n_layers_D: int = 3
    num_D: int = 2
    spectral_norm: bool = False
    n_frames_D: int = 3  # K frames seen by D_V
    n_scales_temporal: int = 2  # D_V at frame steps K**0, K**1, ...
    face_discriminator: bool = False  # pose only: a PatchGAN on a crop around the head (DensePose parts)
    face_crop: float = 0.25  # face crop side as a fraction of the frame height
    # --- losses (defaults: the reference values) ---------------------------------------------
    gan_mode: Literal["ls", "hinge"] = "ls"
    lambda_feat: float = 10.0  # discriminator feature matching
    lambda_vgg: float = 10.0  # VGG19 perceptual
    lambda_F: float = 10.0  # flow endpoint + flow warp (eq. 8)
    lambda_T: float = 10.0  # generated-frame warp loss
    lambda_mask: float = 0.0  # mask regulariser (pushes the mask towards the warped image)
    lambda_face: float = 2.0  # face discriminator's GAN term for G (the reference's face_weight)
    vgg_weights: str | None = None  # torchvision VGG19: a path, "auto" (download once) or None (VGG loss off)

    @property
    def prev_frames(self) -> int:
        return self.n_frames_G - 1

    @property
    def label_channels(self) -> int:
        """Channels of one source frame as fed to G (one-hot or dense, plus instance edges)."""
        base = self.label_nc if self.label_nc > 0 else self.input_nc
        return base + (1 if self.use_instance else 0)


@dataclass
class DataConfig:
    # synthetic | vid2vid folder root | cityscapes raw root | video file/dir | face or pose folder; the
    # presets for real data leave it empty (null), so a run says where to get the data instead of guessing
    source: str | None = "synthetic"
    source_kind: Literal["auto", "synthetic", "vid2vid", "cityscapes", "video", "face", "pose"] = "auto"
    split: str = "train"
    out: str = "runs/shards/synthetic"
    resolution: str = "128x64"  # WxH
    label_nc: int = 35
    clip_len: int = 8
    clip_stride: int = 0  # 0 = clip_len (non-overlapping)
    flow: Literal["dis", "raft"] = "dis"
    raft_weights: str | None = None
    overwrite: bool = False
    rows_per_shard: int = 16  # clips per Parquet shard (at most; see shard_mb)
    shard_mb: int = 256  # cap on a shard's uncompressed size: long videos are cut into several shards
    flow_actors: int = 0  # Ray Data actors estimating flow; 0 = one per Ray CPU
    canny_low: int = 100  # Canny thresholds of the edge->video source
    canny_high: int = 200
    # raw Cityscapes layout: folder (beside leftImg8bit_sequence) with one *labelIds.png per frame, and
    # the folder with *instanceIds.png ("" = the label folder; instances are optional)
    cityscapes_label_dir: str = "gtFine_sequence"
    cityscapes_instance_dir: str = ""
    # Validation split ("val"), used by evaluation: a source's own val split (Cityscapes val,
    # <root>/val_A) is prepared with the train split; else val_source (a folder of the same layout, all
    # of it validation), or training sequences held out by name or by fraction (evenly spread).
    val_source: str | None = None
    val_sequences: list[str] = field(default_factory=list)
    val_fraction: float = 0.0
    # synthetic scenes
    synthetic_sequences: int = 4
    synthetic_frames: int = 12
    synthetic_val_sequences: int = 0  # fresh synthetic sequences (their own seeds) as the val split
    seed: int = 0

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) parsed from ``resolution``."""
        return parse_resolution(self.resolution)


@dataclass
class TrainConfig:
    niter: int = 10  # epochs at the initial learning rate
    niter_decay: int = 10  # epochs of linear decay to 0
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    batch_size: int = 1
    n_frames_total: int = 6  # initial clip length fed to G (frames generated per step)
    max_frames_total: int = 28  # cap of the temporally progressive schedule
    niter_step: int = 5  # clip length doubles every niter_step epochs
    niter_fix_global: int = 0  # epochs during which coarser spatial scales are frozen
    max_steps: int = 0  # > 0 stops after this many steps (smoke runs)
    num_workers: int = 1
    use_gpu: bool = False
    gpus_per_worker: int = 1
    # CPUs a CPU-only worker reserves. Below 1 on a small machine leaves Ray Data CPUs to stream
    # clips; with every CPU held by a train worker, ingest would wait forever.
    cpus_per_worker: float = 1.0
    placement: Literal["colocated", "split"] = "colocated"
    zero_stage: int = 1
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    grad_clip: float = 1.0
    checkpoint_every: int = 0  # steps; 0 = once per epoch
    # Seconds between reports to Ray Train (0: every step). Each report waits for Ray's controller to
    # take the previous one (it polls every 2 s); checkpoints and the run's end always report, and
    # MLflow gets every step's metrics whatever this is. The first step always reports, and a shorter
    # train.progress_every_s wins (progress lines are printed from reports).
    report_every_s: float = 10.0
    max_failures: int = 0
    seed: int = 0
    run_dir: str = "runs"
    experiment: str = "vid2vid"
    tracking_uri: str | None = None  # default: sqlite under run_dir; MLFLOW_TRACKING_URI wins
    warm_start: str | None = None  # checkpoint of a lower-resolution run
    run_name: str | None = None  # default <name>-<timestamp>; an existing run's name resumes it
    allow_config_change: bool = False  # resume a run with a config that differs from its own (the diff is logged)
    progress_every_s: float = 10.0  # the driver's progress line: every step, but at most once per this many s


@dataclass
class EvalConfig:
    # Feature-net weights, each: None (metric skipped; the log and a tag say which file to give), a path,
    # "auto" (the public file, downloaded once into $XDG_CACHE_HOME/vid2vid and checked), or
    # "URL#sha256=<hex>" (a mirror). See vid2vid/weights.py and the README's metric table.
    i3d_weights: str | None = None  # piergiaj rgb_imagenet.pt: eval/fid_i3d and eval/fvd
    styleganv_i3d_weights: str | None = None  # StyleGAN-V i3d_torchscript.pt: eval/fvd_styleganv
    resnext_weights: str | None = None  # kenshohara resnext-101-kinetics.pth: eval/fid_resnext
    split: Literal["val", "train"] = "val"  # train: training clips, only when asked (tagged)
    num_clips: int = 0  # 0 = every clip of the split (the paper's protocol); N = N clips spread evenly
    clip_len: int = 16
    batch_size: int = 4
    fid_frame: Literal["crop", "whole"] = "crop"  # FID-I3D/ResNeXt input: centre crop or whole frame (FVD: whole)
    bootstrap: int = 500  # resamples of the generated clips for the 95% intervals; 0 = none
    # Multimodal models (model.use_features): sampled styles (the checkpoint's styles.npz, fitted on the
    # training split when missing), E's features of the real frames (metrics *_recon), or both.
    styles: Literal["sampled", "real", "both"] = "sampled"
    style_seed: int = 0
    style_fit_clips: int = 64  # training clips fit-styles reads when the checkpoint has no styles.npz
    allow_random_weights: bool = False  # test-only: metrics are tagged as not comparable
    during_training: bool = False
    # Real-data feature statistics, one .npz per (dataset, split, resolution, net, weights sha256);
    # None = <train.run_dir>/eval_stats.
    stats_cache_dir: str | None = None


@dataclass
class Config:
    name: str = "vid2vid"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ------------------------------------------------------------------------------------------------
# Parsing helpers
# ------------------------------------------------------------------------------------------------


def parse_resolution(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise ConfigError(f"resolution: expected WIDTHxHEIGHT such as 512x256, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise ConfigError(f"resolution: width and height must be positive, got {text!r}")
    return w, h


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp in (float, str) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(obj: Any, key_path: str, value: Any, prefix: str = "") -> None:
    head, _, rest = key_path.partition(".")
    hints = _hints(type(obj))
    full = f"{prefix}{head}"
    if head not in hints:
        valid = ", ".join(f"{prefix}{k}" for k in hints)
        raise ConfigError(f"unknown key {full!r}; valid keys: {valid}")
    tp = hints[head]
    if dataclasses.is_dataclass(tp):
        if rest:
            _apply(getattr(obj, head), rest, value, prefix=f"{full}.")
            return
        if not isinstance(value, dict):
            raise ConfigError(f"{full}: expected a mapping of its keys, got {value!r}")
        for k, v in value.items():
            if f"{full}.{k}" in RETIRED_KEYS:  # in a config file written before the key went
                continue
            _apply(getattr(obj, head), str(k), v, prefix=f"{full}.")
        return
    if rest:
        raise ConfigError(f"{full} is a value, not a section; cannot set {full}.{rest}")
    setattr(obj, head, _coerce(full, value, tp))


def apply_mapping(cfg: Any, mapping: dict[str, Any]) -> Any:
    """Apply a (possibly nested) mapping to a config dataclass in place and return it."""
    for key, value in mapping.items():
        _apply(cfg, str(key), value)
    validate(cfg)
    return cfg


# ------------------------------------------------------------------------------------------------
# key=value arguments: the one tokenizer of every command
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyValue:
    """One ``key=value`` argument as typed: the key stripped, the value's text untouched."""

    key: str
    text: str


def split_key_values(args: list[str], noun: str = "override") -> list[KeyValue]:
    """``["model.ngf=64", "out=a=b.mp4"]`` -> key/text pairs, split at the first ``=``.

    Every command reads its arguments through here; what it then does with a key (a config override,
    a sweep axis, a command option) is its own. ``noun`` names the argument in the error message.
    """
    pairs = []
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"{noun} {arg!r} is not of the form key=value")
        key, text = arg.split("=", 1)
        pairs.append(KeyValue(key.strip(), text))
    return pairs


def yaml_value(text: str) -> Any:
    """The YAML value of ``text`` (``""`` for an empty text, not YAML's None)."""
    return yaml.safe_load(text) if text else ""


def number_or_text(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` as a string (it wants ``1.0e-4``): a number-looking string becomes a float."""
    if isinstance(value, str) and any(c in value for c in ".eE"):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def read_value(text: str) -> Any:
    """A config override's typed value: YAML, with ``1e-4`` read as the float it means."""
    return number_or_text(yaml_value(text))


def parse_overrides(args: list[str], default_section: str | None = None) -> dict[str, Any]:
    """``["model.ngf=64", "train.lr=1e-4"]`` -> ``{"model.ngf": 64, "train.lr": 0.0001}``.

    With ``default_section``, that section's keys may come bare (``ngf=64`` means ``model.ngf=64``):
    for the commands that address one section. Top-level keys (``name``, ``preset``) stay top-level.
    """
    own: set[str] = set()
    if default_section:
        own = set(type(getattr(Config(), default_section)).__dataclass_fields__)
        own -= set(Config.__dataclass_fields__) | {"preset"}
    out: dict[str, Any] = {}
    for kv in split_key_values(args):
        key = f"{default_section}.{kv.key}" if "." not in kv.key and kv.key in own else kv.key
        out[key] = read_value(kv.text)
    return out


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _field_value(key: str, text: str, tp: Any) -> Any:
    """A command option's value from its raw text, by the field's type (no YAML guessing)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() in ("", "none", "null"):
            return None
        return _field_value(key, text, args[0])
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"{key}: expected true or false, got {text!r}")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            raise ConfigError(f"{key}: expected {tp.__name__}, got {text!r}") from None
    return text


def parse_command_args(cls: type, args: list[str]) -> Any:
    """A command's own options (a dataclass ``cls``) from ``["key=value", ...]``.

    The generation commands only read a checkpoint, so their few options are not run config: values are
    converted from the raw text by the field's type (``style_class=7`` stays the string ``"7"`` for a
    ``str`` field), an unknown key is an error that names it and lists the valid ones, and fields
    without defaults are required.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for kv in split_key_values(args, noun="argument"):
        if kv.key not in fields:
            raise ConfigError(f"unknown key {kv.key!r}; valid keys: {', '.join(fields)}")
        values[kv.key] = _field_value(kv.key, kv.text.strip(), hints[kv.key])
    missing = [n for n, f in fields.items() if n not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required key(s): {', '.join(missing)}")
    return cls(**values)


def load_preset(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"preset {name_or_path!r}: no file {path}; available presets: {available}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path}: expected a mapping at the top level")
    base = data.pop("base", None)
    if base:
        merged = load_preset(base)
        _deep_update(merged, data)
        return merged
    return data


def _deep_update(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = v


def load_config(args: list[str] | None = None, cls: type = Config) -> Any:
    """Build a config from ``preset=NAME`` (optional) and ``key=value`` overrides, in that order."""
    return config_from_overrides(parse_overrides(args or []), cls)


def config_from_overrides(overrides: dict[str, Any], cls: type = Config) -> Any:
    """Build a config from parsed overrides: ``preset`` (optional) first, then the rest in order."""
    overrides = dict(overrides)
    cfg = cls()
    preset = overrides.pop("preset", None)
    if preset is not None:
        apply_mapping(cfg, load_preset(str(preset)))
    return apply_mapping(cfg, overrides)


def validate(cfg: Any) -> None:
    """Cross-field checks that a type annotation cannot express."""
    model = cfg.model if isinstance(cfg, Config) else cfg if isinstance(cfg, ModelConfig) else None
    if model is not None:
        if not 1 <= model.n_scales_spatial <= 3:
            raise ConfigError(f"model.n_scales_spatial: must be 1, 2 or 3, got {model.n_scales_spatial}")
        if model.n_frames_G < 2:
            raise ConfigError("model.n_frames_G: must be >= 2 (at least one previous frame)")
        if model.label_nc == 0 and model.input_nc == 0:
            raise ConfigError("model.input_nc: must be > 0 when model.label_nc is 0 (dense input)")
        if model.fg_bg_prior and model.label_nc == 0:
            raise ConfigError("model.fg_bg_prior: needs semantic labels (model.label_nc > 0)")
        if model.n_frames_D < 2:
            raise ConfigError("model.n_frames_D: D_V needs at least 2 frames")
        if model.face_discriminator and (model.label_nc != 0 or model.input_nc < 3):
            raise ConfigError("model.face_discriminator: needs the pose source (model.label_nc=0, model.input_nc=6: "
                              "DensePose part index in channel 2 locates the head)")
        if not 0 < model.face_crop <= 1:
            raise ConfigError(f"model.face_crop: must be in (0, 1] (a fraction of the frame height), "
                              f"got {model.face_crop}")
    if isinstance(cfg, Config) and cfg.train.report_every_s < 0:
        raise ConfigError(f"train.report_every_s: must be >= 0 (0 = every step), got {cfg.train.report_every_s}")
    if isinstance(cfg, (Config, DataConfig)):
        data = cfg.data if isinstance(cfg, Config) else cfg
        parse_resolution(data.resolution)
        if data.clip_len < 1:
            raise ConfigError("data.clip_len: must be >= 1")
        if not 0.0 <= data.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction: must be in [0, 1), got {data.val_fraction}")
    if isinstance(cfg, (Config, EvalConfig)):
        ev = cfg.eval if isinstance(cfg, Config) else cfg
        for key in ("num_clips", "bootstrap", "style_fit_clips"):
            if getattr(ev, key) < 0:
                raise ConfigError(f"eval.{key}: must be >= 0, got {getattr(ev, key)}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(cfg: Any) -> dict[str, Any]:
    """Flat ``section.key -> value`` view, e.g. for MLflow params."""
    out: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(to_dict(cfg), "")
    return out
