"""Errors raylm shows to users.

Every `RaylmError` is meant to be printed as one line, without a traceback: its
message says what went wrong and what to do about it.
"""

from __future__ import annotations


class RaylmError(Exception):
    """A problem the user can fix; the CLI prints its message and exits non-zero."""


class PluginError(RaylmError):
    """A plugin could not be loaded, or two plugins claim the same name."""


class UnknownNameError(RaylmError):
    """An engine or backend name that no installed plugin provides."""


class RuntimeMissingError(RaylmError):
    """An engine's or backend's runtime (e.g. `vllm`) is not installed."""


class ConfigError(RaylmError):
    """Invalid user input: a deployment file, a model path, an engine argument."""


class ClusterError(RaylmError):
    """The Ray cluster could not be started, reached or stopped."""


class DeploymentError(RaylmError):
    """A model deployment failed to start or to stop."""
