"""Backbones. Every model is `head(body(x))` so personalized methods can split it."""
