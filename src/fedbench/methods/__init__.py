"""One module per method. Methods know nothing of Hydra, W&B or files.

Importing this package registers every method under its config name.
"""

from fedbench.methods import fedavg, fedprox, scaffold  # noqa: F401
