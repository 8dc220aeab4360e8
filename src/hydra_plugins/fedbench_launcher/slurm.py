"""`hydra/launcher=slurm`: the logic lives in fedbench.run.slurm; Hydra needs the class defined here."""

from fedbench.run.slurm import WaitingSlurmLauncher


class FedbenchSlurmLauncher(WaitingSlurmLauncher):
    """submitit's SLURM launcher whose wait always ends (squeue and the jobs' files; no sacct needed)."""
