"""`hydra/launcher=fused`: the logic lives in fedbench.run.fused_sweep; Hydra needs the class defined here."""

from fedbench.run.fused_sweep import FusedSweepLauncher


class FusedLauncher(FusedSweepLauncher):
    """A whole multirun in one process; jobs that can share one computation run as fused groups."""
