"""LG-FedAvg (Liang et al. 2020): each client keeps its own feature extractor, the classifier is shared
and averaged. Sends the head both ways."""

from fedbench.methods.personal import PersonalizedMethod
from fedbench.registry import register


@register("method", "lgfedavg")
class LGFedAvg(PersonalizedMethod):
    name = "lgfedavg"
    shared = "head"
