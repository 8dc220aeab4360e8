"""One module per method. Methods know nothing of Hydra, W&B or files.

Importing this package registers every method under its config name.
"""

from fedbench.methods import (  # noqa: F401
    afl,
    deepafl,
    ditto,
    fedavg,
    fedbabu,
    fedecouple,
    fedper,
    fedproto,
    fedprox,
    fedrep,
    fedrod,
    fedsq,
    flops,
    lgfedavg,
    local,
    pruning,
    scaffold,
)
