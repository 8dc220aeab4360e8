"""Local: every client trains its own model on its own data; nothing is sent (0 bytes)."""

from fedbench.methods.personal import PersonalizedMethod
from fedbench.registry import register


@register("method", "local")
class Local(PersonalizedMethod):
    name = "local"
    shared = "none"
