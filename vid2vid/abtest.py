"""Human preference (A/B) kit: the paper's Tables 1-2 come from forced-choice side-by-side tests.

``vid2vid ab-pairs run_a=... run_b=... out=DIR`` takes the videos two runs generated *from the same
inputs* (matched by file name; a source is a folder of .mp4 files, or an MLflow run given as
``runs:/<run_id>[/<artifact dir>]``) and writes

    DIR/pairs/pair_001.mp4 ...   left | right, which side is which run drawn at random per pair,
                                 pairs in random order, names that reveal nothing
    DIR/answers.csv              the sheet raters fill in: pair, rater, choice (left | right)
    DIR/key.json                 the answer key (which run is left in each pair): keep it from raters

``vid2vid ab-score answers=answers.csv key=key.json`` un-blinds the answers and gives each run's
preference rate with a 95% confidence interval, two ways:

- Wilson score interval on all answers (Wilson 1927): right for independent answers, better than the
  normal approximation at small n and near 0 or 1;
- a bootstrap over pairs (answers resampled pair by pair, 2000 times, percentile interval): several
  raters judging the same pair are not independent, and this interval widens accordingly.

Answers ``same`` / ``tie`` / empty are counted but left out of the rates (forced choice, as in the
paper).
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from vid2vid.errors import UserError

VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
GAP_PX = 8  # neutral grey bar between the two panels, so raters see two videos, not one wide one
TIE_WORDS = ("same", "tie", "")
Z95 = 1.959963984540054  # two-sided 95% normal quantile


class ABError(UserError, ValueError):
    """Bad A/B input; the message names the file, the line or the pair."""


@dataclass
class PairExport:
    out: Path
    pairs: list[Path]
    key: Path
    answers: Path
    unmatched: dict[str, list[str]]  # "A"/"B" -> inputs only that run has (not exported)


@dataclass
class PreferenceScore:
    run: str  # "A" or "B"
    source: str
    wins: int
    decided: int  # answers that picked a side
    rate: float
    wilson_low: float
    wilson_high: float
    bootstrap_low: float
    bootstrap_high: float


@dataclass
class ABScore:
    scores: list[PreferenceScore]
    answers: int
    ties: int
    pairs: int
    raters: int

    def format(self) -> str:
        lines = [f"{self.answers} answers ({self.ties} ties left out) on {self.pairs} pairs by {self.raters} raters",
                 f"{'run':<4}{'preferred':>10}{'rate':>8}  {'95% Wilson':<17}{'95% bootstrap/pair':<19}source"]
        for s in self.scores:
            lines.append(f"{s.run:<4}{s.wins:>5}/{s.decided:<4}{s.rate:>8.3f}  "
                         f"[{s.wilson_low:.3f}, {s.wilson_high:.3f}]   "
                         f"[{s.bootstrap_low:.3f}, {s.bootstrap_high:.3f}]    {s.source}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Statistics


def wilson_interval(wins: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when there are no answers."""
    if n <= 0:
        return 0.0, 1.0
    p = wins / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(wins_per_pair: list[tuple[int, int]], resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the pooled rate when whole pairs (wins, decided) are resampled."""
    if not wins_per_pair or sum(n for _, n in wins_per_pair) == 0:
        return 0.0, 1.0
    arr = np.asarray(wins_per_pair, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(arr), size=(resamples, len(arr)))
    wins, n = arr[idx, 0].sum(1), arr[idx, 1].sum(1)
    rates = wins[n > 0] / n[n > 0]
    alpha = (1 - level) / 2
    return float(np.quantile(rates, alpha)), float(np.quantile(rates, 1 - alpha))


# ------------------------------------------------------------------------------------------------
# Export


def list_videos(source: str, work: Path, tracking_uri: str | None = None) -> dict[str, Path]:
    """Input name (file stem) -> video, from a folder or from an MLflow run's artifacts."""
    if source.startswith("runs:/"):
        run_id, _, sub = source[len("runs:/"):].partition("/")
        folder = _download_run(run_id, sub, work, tracking_uri)
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise ABError(f"{source}: not a folder of videos; give a folder or runs:/<run_id>[/<artifact dir>]")
    videos = {}
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file():
            name = str(p.relative_to(folder).with_suffix(""))
            videos[name] = p
    if not videos:
        raise ABError(f"{source}: no videos ({', '.join(VIDEO_SUFFIXES)}) found")
    return videos


def _download_run(run_id: str, sub: str, work: Path, tracking_uri: str | None) -> Path:
    from mlflow.tracking import MlflowClient

    dst = work / run_id
    dst.mkdir(parents=True, exist_ok=True)
    try:
        return Path(MlflowClient(tracking_uri=tracking_uri).download_artifacts(run_id, sub or "", str(dst)))
    except Exception as exc:  # noqa: BLE001 - re-raised with what the user typed
        raise ABError(f"runs:/{run_id}/{sub}: cannot download the run's artifacts ({type(exc).__name__}: "
                      f"{str(exc)[:300]})") from exc


def read_video(path: Path) -> list[np.ndarray]:
    import av

    try:
        with av.open(str(path)) as container:
            return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except Exception as exc:  # noqa: BLE001 - PyAV raises many kinds; the file name is what helps
        raise ABError(f"{path}: cannot decode video ({type(exc).__name__}: {exc})") from exc


def compose_pair(left: list[np.ndarray], right: list[np.ndarray], names: tuple[str, str]) -> list[np.ndarray]:
    """Frames of left | grey gap | right, as long as the shorter video; the sizes must match."""
    if not left or not right:
        raise ABError(f"{names[0] if not left else names[1]}: video has no frames")
    if left[0].shape != right[0].shape:
        raise ABError(f"{names[0]} is {left[0].shape[1]}x{left[0].shape[0]} but {names[1]} is "
                      f"{right[0].shape[1]}x{right[0].shape[0]}: A/B pairs need the same resolution")
    gap = np.full((left[0].shape[0], GAP_PX, 3), 128, np.uint8)
    return [np.concatenate([a, gap, b], axis=1) for a, b in zip(left, right, strict=False)]


def export_pairs(run_a: str, run_b: str, out: str | Path, seed: int = 0, fps: float = 15.0,
                 tracking_uri: str | None = None, max_pairs: int = 0) -> PairExport:
    from vid2vid.media import write_video

    out = Path(out)
    if (out / "key.json").exists():
        raise ABError(f"{out}/key.json exists: exporting again would overwrite the key of pairs already sent "
                      f"to raters; choose another out=")
    work = out / ".downloads"
    a, b = list_videos(run_a, work / "A", tracking_uri), list_videos(run_b, work / "B", tracking_uri)
    common = sorted(set(a) & set(b))
    if not common:
        raise ABError(f"no input in common between run_a ({sorted(a)[:5]}...) and run_b ({sorted(b)[:5]}...): "
                      f"videos are matched by file name, both runs must render the same inputs")
    rng = random.Random(seed)
    rng.shuffle(common)
    if max_pairs > 0:
        common = common[:max_pairs]
    (out / "pairs").mkdir(parents=True, exist_ok=True)
    entries, paths = [], []
    width = max(3, len(str(len(common))))
    for i, name in enumerate(common, start=1):
        a_left = rng.random() < 0.5
        left, right = (a[name], b[name]) if a_left else (b[name], a[name])
        frames = compose_pair(read_video(left), read_video(right), (str(left), str(right)))
        pair = f"pair_{i:0{width}d}"
        paths.append(write_video(out / "pairs" / f"{pair}.mp4", frames, fps))
        entries.append({"pair": pair, "input": name, "left": "A" if a_left else "B", "right": "B" if a_left else "A",
                        "frames": len(frames)})
    key = {"runs": {"A": run_a, "B": run_b}, "seed": seed, "pairs": entries}
    (out / "key.json").write_text(json.dumps(key, indent=1))
    with (out / "answers.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pair", "rater", "choice"])
        for e in entries:
            w.writerow([e["pair"], "", ""])
    unmatched = {"A": sorted(set(a) - set(b)), "B": sorted(set(b) - set(a))}
    return PairExport(out, paths, out / "key.json", out / "answers.csv", unmatched)


# ------------------------------------------------------------------------------------------------
# Scoring


def read_answers(path: str | Path) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise ABError(f"{path}: answers file not found")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
        fields = set(rows[0]) if rows else set()
    missing = {"pair", "choice"} - fields
    if rows and missing:
        raise ABError(f"{path}: missing column(s) {sorted(missing)}; expected pair, rater, choice")
    return rows


def score(answers: str | Path, key: str | Path, seed: int = 0) -> ABScore:
    key_path = Path(key)
    if not key_path.is_file():
        raise ABError(f"{key_path}: answer key not found")
    k = json.loads(key_path.read_text())
    sides = {e["pair"]: e for e in k["pairs"]}
    per_pair: dict[str, list[int]] = {}  # pair -> [wins of A, decided]
    total = ties = 0
    raters = set()
    for line, row in enumerate(read_answers(answers), start=2):
        pair, choice = (row.get("pair") or "").strip(), (row.get("choice") or "").strip().lower()
        if not pair:
            continue
        if pair not in sides:
            raise ABError(f"{answers}:{line}: pair {pair!r} is not in the key {key_path}")
        if choice not in ("left", "right", *TIE_WORDS):
            raise ABError(f"{answers}:{line}: choice {row.get('choice')!r} for {pair}; use left, right or same")
        total += 1
        raters.add((row.get("rater") or "").strip())
        counts = per_pair.setdefault(pair, [0, 0])
        if choice in TIE_WORDS:
            ties += 1
            continue
        counts[0] += int(sides[pair][choice] == "A")
        counts[1] += 1
    decided = sum(c[1] for c in per_pair.values())
    if decided == 0:  # a sheet as exported (every choice empty), or only ties: no rate is defined
        raise ABError(f"{answers}: no left or right answer in {total} rows ({ties} same or empty); raters fill "
                      f"the choice column with left, right or same")
    a_pairs = [(c[0], c[1]) for c in per_pair.values()]
    scores = []
    for run, pairs in (("A", a_pairs), ("B", [(n - w, n) for w, n in a_pairs])):
        wins = sum(w for w, _ in pairs)
        lo, hi = wilson_interval(wins, decided)
        blo, bhi = bootstrap_interval(pairs, seed=seed)
        scores.append(PreferenceScore(run, k["runs"][run], wins, decided, wins / decided if decided else math.nan,
                                      lo, hi, blo, bhi))
    return ABScore(scores, total, ties, len(per_pair), len(raters))


# ------------------------------------------------------------------------------------------------
# Command line


def _kv(args: list[str], allowed: dict[str, object], command: str) -> dict[str, object]:
    out = dict(allowed)
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in allowed:
            raise ABError(f"unexpected argument {arg!r}; keys: {', '.join(allowed)}")
        default = allowed[key]
        out[key] = type(default)(value) if default is not None and not isinstance(default, str) else value
    return out


def main_pairs(args: list[str]) -> int:
    """``vid2vid ab-pairs``; an :class:`ABError` becomes one line on stderr, exit status 2 (``vid2vid.cli``)."""
    o = _kv(args, {"run_a": "", "run_b": "", "out": "", "seed": 0, "fps": 15.0, "tracking_uri": None,
                   "max_pairs": 0}, "ab-pairs")
    if not (o["run_a"] and o["run_b"] and o["out"]):
        raise ABError("run_a=, run_b= and out= are required")
    res = export_pairs(o["run_a"], o["run_b"], o["out"], int(o["seed"]), float(o["fps"]), o["tracking_uri"],
                       int(o["max_pairs"]))
    print(f"{len(res.pairs)} pairs in {res.out / 'pairs'}; rater sheet {res.answers}; answer key {res.key} "
          f"(keep it from the raters)")
    for run, names in res.unmatched.items():
        if names:
            print(f"  only run {run} has {len(names)} input(s), not exported: {', '.join(names[:5])}")
    return 0


def main_score(args: list[str]) -> int:
    """``vid2vid ab-score``; an :class:`ABError` becomes one line on stderr, exit status 2 (``vid2vid.cli``)."""
    o = _kv(args, {"answers": "", "key": "", "out": "", "seed": 0}, "ab-score")
    if not (o["answers"] and o["key"]):
        raise ABError("answers= and key= are required")
    res = score(o["answers"], o["key"], int(o["seed"]))
    print(res.format())
    if o["out"]:
        Path(o["out"]).write_text(json.dumps(asdict(res), indent=1))
    return 0
