"""Small independent sinks for what a run reports: JSONL/summary files and W&B."""
