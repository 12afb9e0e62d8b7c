"""Errors raised by prefopt. Every message names what is wrong and where."""


class PrefoptError(Exception):
    """Base class of all prefopt errors."""


class ConfigError(PrefoptError, ValueError):
    """A configuration value is invalid; the message names the field by its path."""


class PluginError(PrefoptError):
    """A plugin failed to load, or two plugins provide the same loss name."""


class UnknownLossError(PrefoptError, KeyError):
    """No installed plugin provides the requested loss name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DataError(PrefoptError, ValueError):
    """A dataset row is malformed; the message names file, row and field."""


class NoSpaceError(PrefoptError, OSError):
    """The disk filled while prefopt wrote a file; the partial file was removed and the message says how much is needed."""
