"""Errors that reach the user as one clear paragraph instead of a traceback."""


class SdrayError(Exception):
    """A problem the user can fix (bad input, bad config, refused output)."""


class ConfigError(SdrayError):
    """The configuration is invalid; the message names the key and value."""


class InputError(SdrayError):
    """The prompt table cannot be used as it is."""


class ModelError(SdrayError):
    """The model cannot be found or loaded."""
