"""The project's user-facing errors: bad input that the user can fix, named in one line.

Every entry point (``vid2vid`` and the experiment scripts, see :mod:`vid2vid.console`) prints a
:class:`UserError` as one line naming the file, frame or key, and exits with status 2; anything else
is a bug and keeps its traceback. The concrete classes also derive from the built-in type callers
already catch (``ValueError``, ``RuntimeError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Input the user can fix (a config key, a file, a frame); the message says which and how."""


class WeightsError(UserError, ValueError):
    """A weights file (RAFT, VGG19, I3D, ResNeXt, a checkpoint's ``weights.pt``) cannot be used."""


class CheckpointError(UserError, FileNotFoundError):
    """``checkpoint=`` names nothing usable: no such path, no checkpoint in a run folder, an unknown run."""
