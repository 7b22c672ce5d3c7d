"""The one root error of the project; every package raises a subclass of it.

Messages say the bad value and the fix, e.g. ``"k must be between 1 and 16, got 40"``.
"""


class PerfusionError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(PerfusionError):
    """A configuration value is invalid."""


class InfrastructureError(PerfusionError):
    """A service the loop needs (Kafka, Redis, Feast) is missing or did not start."""
