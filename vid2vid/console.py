"""What a person sees: the project's own log lines, Ray kept quiet, every error in one line.

Every entry point (the ``vid2vid`` console script and ``experiments/*.py``) runs through :func:`run_main`:

- By default the project's INFO lines go to stdout as ``HH:MM:SS message``, warnings and errors to
  stderr; other libraries show warnings only; lines that Ray forwards from its workers are dropped
  when they match a known-harmless pattern (:data:`HARMLESS`): Ray Train's per-step
  ``Reporting training result`` dump, Ray core's actor-restart notice, a Ray Data deprecation
  warning, DeepSpeed's op-load line; so are the tracebacks Ray's processes print for a failure the
  driver reports anyway (:class:`TracebackFilter`).
- ``--verbose`` (anywhere in the arguments) or ``VID2VID_VERBOSE=1`` shows all of it again, Ray's
  and MLflow's INFO logs included, and prints tracebacks.
- A :class:`~vid2vid.errors.UserError` (or a missing file), also one raised inside a Ray task, actor or
  Ray Train worker and wrapped by Ray on its way back, prints as ``<prog>: <message>`` on one line and
  the exit status is 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from collections.abc import Callable

from vid2vid.errors import UserError

VERBOSE_ENV = "VID2VID_VERBOSE"
VERBOSE_FLAGS = ("--verbose", "-v")
EXIT_USER_ERROR = 2

# Forwarded worker lines that say nothing a user can act on (each seen in runs on this project's machines).
HARMLESS = re.compile("|".join((
    r"Reporting training result \d+: TrainingReport\(",  # Ray Train: every metric of every step
    r"has constructor arguments in the object store and max_restarts > 0",  # Ray core, about its own actors
    r"RayDeprecationWarning: `ExecutionOptions\.exclude_resources`",  # Ray Data inside Ray Train
    r"^\s*self\.exclude_resources = exclude_resources\s*$",  # ... and the source line under it
    r"deepspeed_shm_comm_op built successfully",  # DeepSpeed loading its cached CPU comm op
    r"^(Starting execution of|Execution plan of) Dataset ",  # Ray Data, once per epoch in Ray Train
    r"^Progress bars disabled\. To enable",
    r"✔️ +Dataset \S+ execution finished",
    r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO mlflow",  # MLflow's INFO lines from a worker's tracker
    r"Failed to kill actor \w+, return status: Invalid: KillActor RPC failed",  # GCS, a worker group torn down
    r"Failed to send resource request for train-.* safe to ignore",  # Ray Train's controller, on a busy CPU
    r"^\[mutex\.cc : \d+\] RAW: ",  # abseil's lock tracing, printed now and then by a library in a worker
)))
# Ray-internal actors whose output is only ever its own housekeeping (the placement-group cleaner
# prints a traceback when it cannot tell which of several local Ray instances is its own).
QUIET_ACTORS = ("PlacementGroupCleaner",)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


def split_verbose(argv: list[str]) -> tuple[bool, list[str]]:
    """Remove ``--verbose``/``-v`` from ``argv``; when present, export ``VID2VID_VERBOSE=1`` so the
    rest of the run (the Ray layer, workers started from here) sees it too."""
    rest = [a for a in argv if a not in VERBOSE_FLAGS]
    if len(rest) != len(argv):
        os.environ[VERBOSE_ENV] = "1"
    return is_verbose(), rest


# ------------------------------------------------------------------------------------------------
# logging


class _ProjectFilter(logging.Filter):
    """INFO and up from the project's loggers; WARNING and up from everyone else."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".")[0] == "vid2vid"


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"{self.formatTime(record, '%H:%M:%S')} {level}{record.getMessage()}" + (
            f"\n{self.formatException(record.exc_info)}" if record.exc_info and is_verbose() else "")


def setup_logging(verbose: bool = False) -> None:
    """Configure the root logger once for a command-line process (a no-op where something, such as
    pytest, already did): project INFO lines to stdout, warnings and errors to stderr."""
    root = logging.getLogger()
    if root.handlers:
        logging.getLogger("vid2vid").setLevel(logging.DEBUG if verbose else logging.INFO)
        return
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda r: r.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for h in (out, err):
        h.setFormatter(_Format())
        if not verbose:
            h.addFilter(_ProjectFilter())
        root.addHandler(h)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("vid2vid").setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)
    if not verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported (here, in workers)
        for name in ("mlflow", "ray", "ray.data", "ray.train", "ray.tune", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)


class TracebackFilter:
    """Drops the tracebacks Ray's processes print when a task, an actor or a Ray Train worker fails:
    the exception reaches the driver too, where a user error becomes one line and a bug its traceback."""

    START = re.compile(r"^(Traceback \(most recent call last\):|Exception raised in creation task|"
                       r"The above exception was the direct cause|During handling of the above exception)")

    def __init__(self) -> None:
        self.inside: set[object] = set()  # processes in the middle of a traceback

    def drop(self, pid: object, line: str) -> bool:
        if self.START.search(line):
            self.inside.add(pid)
            return True
        if pid not in self.inside:
            return False
        if not line.strip() or line[0].isspace() or line.lstrip().startswith("^"):
            return True  # a frame, a source line or its marker
        self.inside.discard(pid)  # the closing "module.Error: message" line
        return True


# Lines forwarded from Ray processes that start with a marker go to its handler instead of the screen
# (the progress line: Ray Train runs callbacks in its controller actor, see platform/progress.py).
ROUTES: dict[str, Callable[[str], None]] = {}


def route_worker_lines(marker: str, handler: Callable[[str], None] | None) -> None:
    """Send forwarded lines starting with ``marker`` (the rest of the line) to ``handler``; None stops."""
    if handler is None:
        ROUTES.pop(marker, None)
    else:
        ROUTES[marker] = handler


def quiet_ray_driver() -> None:
    """After ``ray.init`` on the driver: route marked lines from Ray's processes (:func:`route_worker_lines`)
    and, unless verbose, drop known-harmless ones and Ray Data's progress lines. Where Ray does not
    forward worker output (``log_to_driver=False``) there is nothing to filter."""
    import warnings

    import ray.data
    from ray.util.annotations import RayDeprecationWarning

    verbose = is_verbose()
    if not verbose:
        warnings.filterwarnings("ignore", category=RayDeprecationWarning)  # about our calls, for us, not users
        ray.data.DataContext.get_current().enable_progress_bars = False
        for name in ("ray", "ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
        # A failing task or actor: Ray Data logs its stack and "please open an issue on the Ray project";
        # the exception it then raises carries the same, and run_main reports it.
        for name in ("ray.data.exceptions", "ray.data._internal.execution.operators.actor_pool_map_operator"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        from ray._private import worker as ray_worker
    except ImportError:  # pragma: no cover - a Ray without this module: keep its output as is
        return
    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    printer = dict(getattr(dispatcher, "handlers", [])).get("ray_print_logs")  # [(name, handler)]
    if printer is None or getattr(printer, "vid2vid_filtered", False):
        return

    tracebacks = TracebackFilter()

    def filtered(data: dict) -> None:
        lines = []
        for line in data.get("lines", []):
            routed = next((m for m in ROUTES if line.startswith(m)), None)
            if routed is not None:
                ROUTES[routed](line[len(routed):])
            elif verbose or not (HARMLESS.search(line) or data.get("actor_name") in QUIET_ACTORS
                                 or tracebacks.drop(data.get("pid"), line)):
                lines.append(line)
        if lines:
            printer({**data, "lines": lines})

    filtered.vid2vid_filtered = True
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", filtered)


def quiet_ray_worker(verbose: bool) -> None:
    """In a Ray Train worker: Ray Train logs every ``ray.train.report`` (all metrics, ~900 characters)
    at INFO through a logger named after its source file (keep it to warnings), and a failing training
    function's traceback (the driver gets the error too)."""
    if verbose:
        return
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # pragma: no cover
        return
    context.logger.setLevel(logging.WARNING)
    # "Error in training function:" and its traceback: the error reaches the driver, which reports it
    logging.getLogger("ray.train.v2._internal.util").setLevel(logging.CRITICAL)


# ------------------------------------------------------------------------------------------------
# errors


def _is_ray_wrapper(exc: BaseException) -> bool:
    ray_exceptions = sys.modules.get("ray.exceptions")
    return ray_exceptions is not None and isinstance(exc, ray_exceptions.RayError)


USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError)
# The last line of a remote traceback that Ray keeps only as text (an actor that died in __init__):
# "vid2vid.errors.WeightsError: /w/raft-small.pth: unexpected key ..."
REMOTE_ERROR_LINE = re.compile(r"^(vid2vid(?:\.\w+)*)\.(\w+): (.+)$", re.MULTILINE)


def find_user_error(exc: BaseException) -> BaseException | None:
    """The first user error in ``exc``, its causes, and what Ray wrapped on the way back from a task,
    an actor or a Ray Train worker (``RayTaskError.cause``, ``WorkerGroupError.worker_failures``,
    ``ControllerError.controller_failure``, the exception behind a worker's traceback text); else one
    named in the text of a remote traceback (Ray keeps no object for an actor's failed ``__init__``)."""
    queue: list[BaseException | None] = [exc]
    seen: dict[int, BaseException] = {}
    while queue:
        e = queue.pop(0)
        if e is None or id(e) in seen:
            continue
        seen[id(e)] = e
        if not _is_ray_wrapper(e) and isinstance(e, USER_ERRORS):
            return e
        for attr in ("cause", "_base_exc", "controller_failure", "__cause__", "__context__"):
            nxt = getattr(e, attr, None)
            if isinstance(nxt, BaseException):
                queue.append(nxt)
        queue.extend(v for v in (getattr(e, "worker_failures", None) or {}).values() if isinstance(v, BaseException))
    for e in seen.values():
        found = _from_traceback_text(str(e)) if _is_ray_wrapper(e) else None
        if found is not None:
            return found
    return None


def _from_traceback_text(text: str) -> BaseException | None:
    import importlib

    for module, name, message in reversed(REMOTE_ERROR_LINE.findall(text)):
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(cls, type) and issubclass(cls, UserError):
            return UserError(message.strip())
    return None


def one_line(exc: BaseException) -> str:
    """The error's message with its lines joined: what the one-line report prints."""
    text = str(exc) if not isinstance(exc, KeyError) or not exc.args else str(exc.args[0])
    return "; ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__


def run_main(prog: str, fn: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Run an entry point: ``--verbose`` handling, logging, and user errors as one line (status 2)."""
    verbose, argv = split_verbose(list(argv))
    setup_logging(verbose)
    try:
        return int(fn(argv) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - user errors become one line; anything else re-raises
        found = find_user_error(exc)
        if found is None:
            raise
        if verbose:
            traceback.print_exception(exc)
        print(f"{prog}: {one_line(found)}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
