"""Optional callbacks, one module each, registered with `@callback(NAME)` and chosen from config:
`fedbench +callbacks=early_stop`, `fedbench logger=csv`, `logger.sinks=[wandb,tensorboard]`."""
