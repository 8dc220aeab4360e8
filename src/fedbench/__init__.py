"""fedbench: Hydra-configured federated-learning experiments simulated in one process."""

__version__ = "0.1.0"
