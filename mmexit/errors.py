"""Errors a user can fix. Each carries one line naming the cause; tools print it and exit 2."""


class MMExitError(Exception):
    """Base class: the message is a single line meant for the user, not a traceback."""

    exit_code = 2


class RecipeError(MMExitError):
    """A recipe key is unknown, of the wrong type, missing, or names an unknown component."""


class DataError(MMExitError):
    """A data file is missing or malformed (the message names file and line)."""


class ModelLoadError(MMExitError):
    """A model path or hub id cannot be loaded (offline, missing files, unsupported family)."""


class CalibrationError(MMExitError):
    """A calibration cannot produce what was asked (e.g. a target accuracy no threshold reaches)."""
