"""The one error type users see: a bad config value, reported as one line."""


class ConfigError(ValueError):
    """A config value that cannot work. The message names the key and what is allowed."""
