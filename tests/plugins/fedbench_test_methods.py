"""Test-only plugin methods (FEDBENCH_PLUGINS=fedbench_test_methods, hydra.searchpath=[file://.../conf])."""

import dataclasses

from fedbench.methods.base import LocalSGDConfig, LocalSGDMethod
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
