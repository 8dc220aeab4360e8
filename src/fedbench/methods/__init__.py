"""One module per method. Methods know nothing of Hydra, W&B or files.

Importing this package registers every method under its config name.
"""

from fedbench.methods import afl, deepafl, fedavg, fedprox, fedsq, flops, pruning, scaffold  # noqa: F401
