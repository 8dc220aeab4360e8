"""FedAvg (McMahan et al. 2017). Sends the model down and the locally trained model up."""

from fedbench.methods.local_sgd import LocalSGDMethod
from fedbench.registry import register


@register("method", "fedavg")
class FedAvg(LocalSGDMethod):
    name = "fedavg"
    fusable = True
    run_keys = ("server_lr",)
