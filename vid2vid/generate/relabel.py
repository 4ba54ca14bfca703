"""Semantic manipulation (paper §4, Fig. 4): rewrite label ids before the generator sees them.

``relabel=building:vegetation,vegetation:building`` swaps trees and buildings. The mapping is applied
through one lookup table, so every pair is applied to the ORIGINAL map at once: a swap really swaps
(applied one pair after the other it would turn both classes into one).
"""

from __future__ import annotations

import numpy as np

from vid2vid.config import ConfigError

# Cityscapes labelIds of the classes the paper's street scenes use (the official ids).
CITYSCAPES_IDS: dict[str, int] = {
    "road": 7, "sidewalk": 8, "building": 11, "wall": 12, "fence": 13, "pole": 17,
    "traffic light": 19, "traffic sign": 20, "vegetation": 21, "terrain": 22, "sky": 23,
    "person": 24, "rider": 25, "car": 26, "truck": 27, "bus": 28, "train": 31,
    "motorcycle": 32, "bicycle": 33,
}


def class_id(token: str, label_nc: int, what: str = "relabel") -> int:
    """A Cityscapes class name (``traffic_light`` or ``traffic light``) or a numeric id -> id."""
    text = token.strip().lower().replace("_", " ")
    if text.isdigit():
        idx = int(text)
    elif text in CITYSCAPES_IDS:
        idx = CITYSCAPES_IDS[text]
    else:
        names = ", ".join(n.replace(" ", "_") for n in CITYSCAPES_IDS)
        raise ConfigError(f"{what}: unknown class {token!r}; use an id or one of: {names}")
    if label_nc <= 0:
        raise ConfigError(f"{what}: the model takes a dense source (label_nc 0), it has no classes")
    if idx >= label_nc:
        raise ConfigError(f"{what}: class {token!r} is id {idx}, not below the model's label_nc {label_nc}")
    return idx


def parse_relabel(text: str, label_nc: int) -> dict[int, int]:
    """``"building:vegetation,7:8"`` -> ``{11: 21, 7: 8}``; each source class may appear once."""
    mapping: dict[int, int] = {}
    for pair in (p for p in text.split(",") if p.strip()):
        if pair.count(":") != 1:
            raise ConfigError(f"relabel: {pair!r} is not of the form from:to")
        src, dst = (class_id(t, label_nc) for t in pair.split(":"))
        if src in mapping:
            raise ConfigError(f"relabel: class {pair.split(':')[0]!r} (id {src}) is mapped twice")
        mapping[src] = dst
    return mapping


def relabel_table(mapping: dict[int, int]) -> np.ndarray:
    """A 256-entry uint8 lookup table: identity except for the mapped ids."""
    lut = np.arange(256, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut


def apply_relabel(labels: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Every pixel looked up in the ORIGINAL map: simultaneous, so a:b,b:a swaps."""
    return lut[labels]
