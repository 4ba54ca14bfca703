"""One-line errors: a user error is found inside the exceptions Ray wraps it in on its way back.

The command-line tests (test_bad_input.py, test_experiment_script.py) drive real Ray; this checks each
wrapper shape Ray 2.60 uses, built from Ray's own exception classes, without starting Ray.
"""

from __future__ import annotations

import logging

import pytest
from ray.exceptions import RayTaskError
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

from vid2vid.config import ConfigError
from vid2vid.console import find_user_error, one_line, run_main
from vid2vid.errors import WeightsError


def ray_task_error(cause: Exception) -> Exception:
    """What ``ray.get`` raises for an exception in a task: a RayTaskError that also *is* the cause's type."""
    return RayTaskError("fn", "Traceback (most recent call last):\n  ...\n" + str(cause), cause).as_instanceof_cause()


def test_user_errors_are_found_inside_rays_wrappers():
    cause = WeightsError("/w/raft-small.pth: unexpected key 'x'")
    wrapped = ray_task_error(cause)
    assert isinstance(wrapped, WeightsError) and len(str(wrapped).splitlines()) > 1  # Ray's long text
    assert find_user_error(wrapped) is cause  # the cause's own one-line message, not Ray's wall
    in_worker = WorkerGroupError("Training failed", {1: UserExceptionWithTraceback(cause, "Traceback ...")})
    assert find_user_error(in_worker) is cause
    assert find_user_error(ControllerError(in_worker)) is cause
    try:
        raise RuntimeError("while preparing") from wrapped
    except RuntimeError as chained:
        assert find_user_error(chained) is cause
    assert find_user_error(WorkerGroupError("failed", {0: ValueError("a bug")})) is None


def test_one_line_and_exit_status(capsys):
    assert one_line(ConfigError("bad\n  first\n\n  second")) == "bad; first; second"

    def fails(_):
        raise ray_task_error(ConfigError("data.clip_len: must be >= 1"))

    assert run_main("vid2vid prepare", fails, []) == 2
    assert capsys.readouterr().err == "vid2vid prepare: data.clip_len: must be >= 1\n"

    def bug(_):
        raise ZeroDivisionError("a bug keeps its traceback")

    with pytest.raises(ZeroDivisionError):
        run_main("vid2vid prepare", bug, [])
    logging.getLogger("vid2vid").setLevel(logging.NOTSET)
