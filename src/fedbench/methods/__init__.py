"""One module per method. Methods know nothing of Hydra, W&B or files.

Every module here is imported by `fedbench.registry.discover("method")` on first use, so a new method is
one module (plus its YAML preset); nothing lists them by hand.
"""
