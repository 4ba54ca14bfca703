"""The console commands of this subpackage (``vid2vid generate | fit-styles | predict | predict-train``).

Each parses its ``key=value`` arguments into its dataclass, runs, prints one summary line and returns
the exit status; input problems (a bad file, a model that cannot take the input) become a
:class:`~vid2vid.errors.UserError` that :func:`vid2vid.cli.main` prints as one line (status 2).
"""

from __future__ import annotations

from collections.abc import Callable

from vid2vid.config import parse_command_args
from vid2vid.errors import UserError


def _run(name: str, body: Callable[[], str]) -> int:
    try:
        print(body())
    except UserError:
        raise
    except (ValueError, FileNotFoundError) as err:  # the generation code's input checks name the file
        raise UserError(str(err)) from err
    return 0


def generate_command(args: list[str]) -> int:
    from vid2vid.generate.inference import GenerateArgs, generate

    def body() -> str:
        r = generate(parse_command_args(GenerateArgs, args))
        extra = "".join(f", {p}" for p in (r.side_by_side, r.png_dir) if p)
        return f"wrote {r.frames} frames to {r.out}{extra} ({r.frames_per_second:.2f} frames/s)"

    return _run("generate", body)


def fit_styles_command(args: list[str]) -> int:
    from vid2vid.generate.styles import FitStylesArgs, fit_styles

    def body() -> str:
        a = parse_command_args(FitStylesArgs, args)
        r = fit_styles(a.checkpoint, a.shards, a.split, a.components, a.max_clips, a.max_per_class, a.seed,
                       out=a.out)
        return f"fitted {len(r.bank.classes)} class mixtures on {r.clips} clips -> {r.path}"

    return _run("fit-styles", body)


def predict_train_command(args: list[str]) -> int:
    from vid2vid.generate.predict import PredictTrainArgs, train_predictor

    def body() -> str:
        r = train_predictor(parse_command_args(PredictTrainArgs, args))
        return f"trained the label predictor {r.steps} steps (loss {r.losses[0]:.3f} -> {r.losses[-1]:.3f}) -> {r.path}"

    return _run("predict-train", body)


def predict_command(args: list[str]) -> int:
    from vid2vid.generate.predict import PredictArgs, predict

    def body() -> str:
        r = predict(parse_command_args(PredictArgs, args))
        return f"rendered {r.observed} observed + {r.predicted} predicted frames to {r.out}"

    return _run("predict", body)
