"""FedPer (Arivazhagan et al. 2019): the feature extractor is shared and averaged, each client keeps
its own classifier. Sends the body both ways."""

from fedbench.methods.personal import PersonalizedMethod
from fedbench.registry import register


@register("method", "fedper")
class FedPer(PersonalizedMethod):
    name = "fedper"
    shared = "body"
    two_extractors = True
    fusable = True
    run_keys = ("server_lr",)
