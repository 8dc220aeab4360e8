"""The errors a run can end with; the CLI maps each to one line and an exit code (2, 3, 4)."""


class ConfigError(ValueError):
    """A config value that cannot work. The message names the key and what is allowed."""


class DivergedError(RuntimeError):
    """Training produced a non-finite loss; the metrics logged so far are kept."""


class Preempted(RuntimeError):
    """The run stopped at a round boundary after writing its checkpoint; rerun to continue."""


class RunDirBusy(ConfigError):
    """Another fedbench process holds the run dir; nothing in it may be touched."""


class RunDirTaken(RunDirBusy):
    """The run dir holds a run of another config; nothing in it may be touched."""
