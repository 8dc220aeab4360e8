"""Client execution: the functional loss and the sequential / batched executors."""
