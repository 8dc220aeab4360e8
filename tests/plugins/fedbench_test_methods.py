"""Test-only plugin methods (FEDBENCH_PLUGINS=fedbench_test_methods, hydra.searchpath=[file://.../conf])."""

import dataclasses

from fedbench.methods.local_sgd import LocalSGDConfig, LocalSGDMethod
from fedbench.registry import register


@dataclasses.dataclass(frozen=True)
class FailingConfig(LocalSGDConfig):
    fail_round: int = 2   # the server step of this round raises ...
    fail_seed: int = -1   # ... in the run with this seed (-1: never)


@register("method", "failing")
class Failing(LocalSGDMethod):
    """FedAvg that raises in the server step of `fail_round` when the run's seed is `fail_seed`."""

    name = "failing"
    Config = FailingConfig

    def aggregate(self, gstate, up, ctx):
        if ctx.round == self.cfg.fail_round and self.ctx.seed == self.cfg.fail_seed:
            raise RuntimeError(f"planned failure at round {ctx.round}")
        return super().aggregate(gstate, up, ctx)


@dataclasses.dataclass(frozen=True)
class WaitingConfig(LocalSGDConfig):
    wait_round: int = 2   # the server step of this round waits ...
    gate: str = ""        # ... until this file exists ("": never waits)


@register("method", "waiting")
class Waiting(LocalSGDMethod):
    """FedAvg whose server step of `wait_round` waits for the file `gate`: a run held still mid-way, so a
    test can look at its run dir while it is busy."""

    name = "waiting"
    Config = WaitingConfig

    def aggregate(self, gstate, up, ctx):
        import time
        from pathlib import Path

        from fedbench.run.callbacks import StopFlag

        while ctx.round == self.cfg.wait_round and self.cfg.gate and not Path(self.cfg.gate).exists() \
                and not StopFlag.requested:  # SIGTERM (scancel, preemption) ends the wait at once
            time.sleep(0.1)
        return super().aggregate(gstate, up, ctx)
