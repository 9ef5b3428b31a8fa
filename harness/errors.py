"""Errors a user can act on. The CLI prints their message in one or two lines (no traceback unless
HYDRA_FULL_ERROR=1) and exits with `exit_code`; anything else is a bug and keeps its traceback."""
from __future__ import annotations


class UserError(Exception):
    """Bad input (config value, data, path): the message names the value and the fix."""

    exit_code = 2


class DataError(UserError, ValueError):
    """The data cannot be used as configured (empty split, missing column, over-long sample under on_too_long=error)."""


class OutsideDataDir(DataError, PermissionError):
    """A data file names a file outside its own folder (absolute path, '..', a symlink out): refused, never skipped."""


class CheckFailed(UserError):
    """A check the user asked for did not pass (e.g. mode=replay found different losses)."""

    exit_code = 1


class RunDiverged(UserError):
    """Training met a non-finite loss or gradient and stopped (train.on_nonfinite=stop); outputs are kept.
    `step`: where; `restored_from`: the finite checkpoint now in the model (None: its weights are unusable);
    `result`: harness.train.TrainResult of the run up to there."""

    exit_code = 1

    def __init__(self, message: str, step: int | None = None, restored_from=None, result=None):
        super().__init__(message)
        self.step, self.restored_from, self.result = step, restored_from, result


class StageFailed(Exception):
    """A stage after training failed; everything produced before it is kept and metrics.json names the stage."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage {stage!r} failed: {type(cause).__name__}: {cause}")
        self.stage, self.cause = stage, cause
