"""The one error type for config problems."""


class ConfigError(ValueError):
    """A config problem, phrased for the user in one line, naming the offending key."""
