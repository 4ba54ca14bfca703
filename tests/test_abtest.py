"""A/B preference kit: blinded pair export, un-blinding, and the confidence intervals."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy.stats import binomtest

from vid2vid.abtest import ABError, bootstrap_interval, export_pairs, read_video, score, wilson_interval
from vid2vid.cli import main as cli
from vid2vid.media import write_video

RED, BLUE = (220, 30, 30), (30, 30, 220)


def _videos(folder, names, colour, size=(32, 48), frames=4):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        img = np.zeros((*size, 3), np.uint8)
        img[:] = colour
        write_video(folder / f"{name}.mp4", [img] * frames, fps=5)
    return folder


def _side_colour(frame: np.ndarray, side: str) -> str:
    w = (frame.shape[1] - 8) // 2
    panel = frame[:, :w] if side == "left" else frame[:, -w:]
    r, _, b = panel.reshape(-1, 3).mean(0)
    return "A" if r > b else "B"  # run A rendered red, run B blue


@pytest.mark.parametrize("wins,n", [(8, 10), (0, 12), (37, 50), (1, 1)])
def test_wilson_matches_scipy(wins, n):
    ci = binomtest(wins, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(wins, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_bootstrap_over_pairs_widens_for_correlated_raters():
    # 10 pairs x 5 raters. Independent-looking: every pair split 3/2. Correlated: raters agree within a
    # pair (6 pairs all A, 4 all B). Same pooled rate 0.6; only the correlated one should be uncertain.
    split = [(3, 5)] * 10
    agree = [(5, 5)] * 6 + [(0, 5)] * 4
    lo_s, hi_s = bootstrap_interval(split)
    lo_a, hi_a = bootstrap_interval(agree)
    assert lo_s == pytest.approx(0.6) and hi_s == pytest.approx(0.6)
    w_lo, w_hi = wilson_interval(30, 50)
    assert hi_a - lo_a > hi_s - lo_s and hi_a - lo_a > w_hi - w_lo
    assert lo_a <= 0.6 <= hi_a


def test_export_blinds_randomises_and_key_unblinds(tmp_path):
    names = [f"seq{i}" for i in range(5)]
    a = _videos(tmp_path / "a", [*names, "only_a"], RED)
    b = _videos(tmp_path / "b", names, BLUE)
    res = export_pairs(str(a), str(b), tmp_path / "out", seed=1)
    key = json.loads(res.key.read_text())
    assert len(res.pairs) == 5 and res.unmatched == {"A": ["only_a"], "B": []}
    assert sorted(e["input"] for e in key["pairs"]) == names
    assert {e["left"] for e in key["pairs"]} == {"A", "B"}  # seed 1 puts A on both sides somewhere
    for e, path in zip(key["pairs"], res.pairs, strict=True):
        assert path.name == f"{e['pair']}.mp4" and not any(n in path.name for n in names)  # names reveal nothing
        frames = read_video(path)
        assert len(frames) == 4 and frames[0].shape == (32, 48 * 2 + 8, 3)
        assert _side_colour(frames[0], "left") == e["left"] and _side_colour(frames[0], "right") == e["right"]
    with res.answers.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["pair"] for r in rows] == [e["pair"] for e in key["pairs"]]
    again = export_pairs(str(a), str(b), tmp_path / "out2", seed=1)
    assert json.loads(again.key.read_text())["pairs"] == key["pairs"]  # deterministic under a seed
    with pytest.raises(ABError, match="key.json exists"):
        export_pairs(str(a), str(b), tmp_path / "out", seed=1)


def test_export_errors_name_the_files(tmp_path):
    a = _videos(tmp_path / "a", ["x"], RED)
    with pytest.raises(ABError, match="no input in common"):
        export_pairs(str(a), str(_videos(tmp_path / "b", ["y"], BLUE)), tmp_path / "o1")
    big = _videos(tmp_path / "c", ["x"], BLUE, size=(64, 48))
    with pytest.raises(ABError, match=r"a/x.mp4 is 48x32 but .*c/x.mp4 is 48x64|c/x.mp4 is 48x64 but .*a/x.mp4"):
        export_pairs(str(a), str(big), tmp_path / "o2")
    with pytest.raises(ABError, match="not a folder of videos"):
        export_pairs(str(tmp_path / "nope"), str(a), tmp_path / "o3")


def test_score_unblinds_answers_and_excludes_ties(tmp_path):
    key = {"runs": {"A": "runA", "B": "runB"}, "seed": 0,
           "pairs": [{"pair": "p1", "left": "A", "right": "B"}, {"pair": "p2", "left": "B", "right": "A"}]}
    (tmp_path / "key.json").write_text(json.dumps(key))
    answers = [("p1", "r1", "left"), ("p1", "r2", "left"), ("p1", "r3", "right"),  # A, A, B
               ("p2", "r1", "right"), ("p2", "r2", "Same"), ("p2", "r3", "left")]   # A, tie, B
    with (tmp_path / "answers.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("pair", "rater", "choice"), *answers])
    res = score(tmp_path / "answers.csv", tmp_path / "key.json")
    a, b = res.scores
    assert (a.run, a.wins, a.decided, b.wins, b.decided) == ("A", 3, 5, 2, 5)
    assert (res.answers, res.ties, res.pairs, res.raters) == (6, 1, 2, 3)
    assert a.rate == pytest.approx(0.6) and (a.wilson_low, a.wilson_high) == pytest.approx(wilson_interval(3, 5))
    assert b.wilson_low == pytest.approx(1 - a.wilson_high)

    with (tmp_path / "bad.csv").open("w") as f:
        f.write("pair,rater,choice\np1,r1,left\np9,r1,left\n")
    with pytest.raises(ABError, match=r"bad.csv:3: pair 'p9' is not in the key"):
        score(tmp_path / "bad.csv", tmp_path / "key.json")
    (tmp_path / "bad2.csv").write_text("pair,rater,choice\np1,r1,middle\n")
    with pytest.raises(ABError, match=r"bad2.csv:2: choice 'middle'"):
        score(tmp_path / "bad2.csv", tmp_path / "key.json")
    (tmp_path / "bad3.csv").write_text("pair,who\np1,r1\n")
    with pytest.raises(ABError, match=r"missing column\(s\) \['choice'\]"):
        score(tmp_path / "bad3.csv", tmp_path / "key.json")


def test_cli_round_trip_from_an_mlflow_run(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("ab", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp).info.run_id
    client.log_artifacts(run, str(_videos(tmp_path / "a", ["s1", "s2", "s3"], RED)), "videos")
    b = _videos(tmp_path / "b", ["s1", "s2", "s3"], BLUE)
    out = tmp_path / "out"
    assert cli(["ab-pairs", f"run_a=runs:/{run}/videos", f"run_b={b}", f"out={out}", f"tracking_uri={uri}",
                "seed=3"]) == 0
    key = json.loads((out / "key.json").read_text())
    assert key["runs"]["A"] == f"runs:/{run}/videos" and len(key["pairs"]) == 3
    # every rater prefers run A: answer whichever side A is on
    with (out / "answers.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pair", "rater", "choice"])
        for e in key["pairs"]:
            w.writerow([e["pair"], "r1", "left" if e["left"] == "A" else "right"])
    capsys.readouterr()
    assert cli(["ab-score", f"answers={out / 'answers.csv'}", f"key={out / 'key.json'}",
                f"out={out / 'score.json'}"]) == 0
    printed = capsys.readouterr().out
    assert "3 answers (0 ties left out) on 3 pairs by 1 raters" in printed
    saved = json.loads((out / "score.json").read_text())
    assert saved["scores"][0]["wins"] == 3 and saved["scores"][0]["rate"] == 1.0
    assert cli(["ab-score", f"answers={out / 'answers.csv'}"]) == 2
    assert "answers= and key= are required" in capsys.readouterr().err
