"""DeepAFL (Tang et al., ICLR 2026): deep analytic FL with residual analytic blocks, layer by layer.

    Phi_0     = tanh(x A_0 + a_0)                    A_0: d -> h, random, never trained
    F_t       = sigma(Phi_t B_t + b_t)               B_t: h -> f, random, never trained
    Phi_{t+1} = Phi_t + F_t Omega_{t+1}              Omega: f x h, closed form
    logits    = Phi_n W_n                            a ridge classifier for every layer n = 0..T

2T + 1 rounds, all clients every round. Round r = 2n + 1 is the classifier round of layer n (clients
upload Phi_n^T Phi_n and Phi_n^T Y; the server solves W_n), round 2n + 2 the residual round (clients
upload F^T F and W_n R^T F with R = Y - Phi_n W_n; the server solves the sandwiched least squares for
Omega_{n+1}). `residual_payload: code` (default) is that upload, the official code's W_n R^T F (h x f);
`paper` uploads Algorithm 1's F^T R (f x C) and the server forms W_n (F^T R)^T itself: the same Omega,
f C instead of h f values per client. The default follows the code, whose runs the paper's figures come
from. The random maps come from a shared seed and cost 0 bytes. The model is the same for any
partition of the data, and equals the centralised solve.

Random maps (`init: linear`, the official code's nn.Linear layers): weights and biases drawn by nn.Linear's
own init routine, U(+-1/sqrt(fan_in)), in float32 from the shared seed; `init: normal` is fedbench's earlier
N(0, 1/fan_in) (sqrt(3) times the spread).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch
import torch.nn.functional as F

from fedbench.config import spec
from fedbench.engine.protocol import ClientFns, RoundContext
from fedbench.methods.analytic import AnalyticConfig, AnalyticMethod, ridge_solve, sandwich_solve
from fedbench.metrics.comm import CACHED, Payload
from fedbench.registry import register

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


@dataclasses.dataclass(frozen=True)
class DeepAFLConfig(AnalyticConfig):
    T: int = spec(20, ge=0)  # residual blocks: 2T + 1 rounds
    h: int = spec(1024, ge=1)  # width of the representation Phi
    f: int = spec(1024, ge=1)  # width of each block's random features F
    residual_ridge: float = spec(0.05, gt=0)  # gamma of the sandwiched least squares
    activation: str = spec("gelu", choices=tuple(ACTIVATIONS))  # gelu | relu | tanh | sigmoid
    random_seed: int = spec(0, ge=0)  # shared seed of the random maps (never sent: 0 bytes)
    # linear: nn.Linear's U(+-1/sqrt(fan_in)) (official code); normal: N(0, 1/fan_in)
    init: str = spec("linear", choices=("linear", "normal"))
    # the residual round's second upload: code (W_n R^T F, h x f; official code) | paper (F^T R, f x C)
    residual_payload: str = spec("code", choices=("code", "paper"))



def linear_init(fan_in: int, fan_out: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [fan_out, fan_in], bias) as torch.nn.Linear.reset_parameters draws them, from generator g."""
    weight = torch.empty(fan_out, fan_in)
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=g)
    bound = 1.0 / math.sqrt(fan_in)
    return weight, torch.nn.init.uniform_(torch.empty(fan_out), -bound, bound, generator=g)


def normal_init(fan_in: int, fan_out: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """fedbench's earlier maps: N(0, 1/fan_in) weights and biases (float64 draws)."""
    scale = 1.0 / math.sqrt(fan_in)
    weight = torch.randn(fan_in, fan_out, generator=g, dtype=torch.float64).T * scale
    return weight, torch.randn(fan_out, generator=g, dtype=torch.float64) * scale


@register("method", "deepafl")
class DeepAFL(AnalyticMethod):
    name = "deepafl"
    Config = DeepAFLConfig

    def __init__(self, config: DeepAFLConfig | None = None):
        super().__init__(config)
        self.T, self.h, self.f = self.cfg.T, self.cfg.h, self.cfg.f
        self.act = ACTIVATIONS[self.cfg.activation]

    def required_rounds(self) -> int:
        return 2 * self.T + 1

    @staticmethod
    def phase_of(round_: int) -> tuple[str, int]:
        n, odd = divmod(round_ - 1, 2)
        return ("classifier" if odd == 0 else "residual"), n

    # ---- shared-seed random maps (never sent) -------------------------------------------
    def random_maps(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        """{A0, a0, B_t, b_t} from the shared seed, drawn layer by layer (weight then bias) in this order."""
        g = torch.Generator().manual_seed(self.cfg.random_seed)
        layers = [("A0", "a0", self.in_features, self.h)] + [(f"B{t}", f"b{t}", self.h, self.f)
                                                              for t in range(self.T)]
        maps = {}
        for w_key, b_key, fan_in, fan_out in layers:
            weight, bias = (linear_init if self.cfg.init == "linear" else normal_init)(fan_in, fan_out, g)
            maps[w_key] = weight.T.to(self.stats_dtype).to(device)  # x @ W: [fan_in, fan_out]
            maps[b_key] = bias.to(self.stats_dtype).to(device)
        return maps

    def init_global(self, params: Any, buffers: Any) -> dict[str, Any]:
        return {"maps": self.random_maps(self.device), "W": {}, "Omega": {}, "layer": -1}

    # ---- the representation ---------------------------------------------------------------
    def features(self, maps: dict[str, torch.Tensor], omegas: dict[str, torch.Tensor], x: torch.Tensor,
                 n: int) -> torch.Tensor:
        """Phi_n(x) with blocks 1..n."""
        xf = x.reshape(x.shape[0], -1).to(self.stats_dtype)
        phi = torch.tanh(xf @ maps["A0"] + maps["a0"])
        for t in range(n):
            phi = phi + self.act(phi @ maps[f"B{t}"] + maps[f"b{t}"]) @ omegas[f"{t + 1}"]
        return phi

    # ---- server ---------------------------------------------------------------------------
    def broadcast(self, gstate: dict[str, Any], ctx: RoundContext) -> Payload:
        kind, n = self.phase_of(ctx.round)
        # Omegas the clients received in earlier rounds are cached there (0 bytes now); only the
        # newest one, solved in the previous round, travels. The random maps never travel.
        omegas = dict(gstate["Omega"])
        enc = {f"omega/{k}": CACHED for k in omegas}
        if kind == "classifier" and n > 0:
            enc[f"omega/{n}"] = "dense"
        tensors: dict[str, Any] = {f"omega/{k}": self.on_wire(v) for k, v in omegas.items()}
        tensors["maps"] = gstate["maps"]
        enc["maps"] = CACHED
        if kind == "residual":
            tensors["W"] = self.on_wire(gstate["W"][n])
        return Payload(tensors, encodings=enc)

    def aggregate(self, gstate: dict[str, Any], up: dict[str, Any],
                  ctx: RoundContext) -> tuple[dict[str, Any], dict[str, Any]]:
        kind, n = self.phase_of(ctx.round)
        s = self.aggregate_sums(up)
        new = dict(gstate, W=dict(gstate["W"]), Omega=dict(gstate["Omega"]))
        # the server keeps each solution as the clients receive it (payload dtype), so both use one model
        if kind == "classifier":
            new["W"][n] = self.as_sent(ridge_solve(s["gram"], s["rhs"], self.cfg.ridge))
            new["layer"] = n
        else:
            # paper: the clients sent F^T R; W_n (F^T R)^T is the code's W_n R^T F
            cross = s["cross"] if self.cfg.residual_payload == "code" else gstate["W"][n] @ s["ftr"].T
            new["Omega"][f"{n + 1}"] = self.as_sent(sandwich_solve(s["gram_f"], cross, gstate["W"][n],
                                                                   self.cfg.residual_ridge))
        return new, {"analytic/layer": n, "analytic/phase": kind}

    def should_evaluate(self, round_: int, due: bool) -> bool:
        return self.phase_of(round_)[0] == "classifier"  # a new classifier exists only after these

    predicts_with_backbone = False  # its own predict

    def predict(self, gstate: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
        n = gstate["layer"]
        return self.features(gstate["maps"], gstate["Omega"], x, n) @ gstate["W"][n]

    def model_tensors(self, gstate: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {f"W{n}": w for n, w in gstate["W"].items()}
        out.update({f"Omega{k}": v for k, v in gstate["Omega"].items()})
        return out

    # ---- client (one client; batchable) -----------------------------------------------------
    def client_fns(self, ctx: RoundContext) -> ClientFns:
        """The round's phase (classifier or residual round of layer n) is static: bound here."""
        phase = self.phase_of(ctx.round)
        return ClientFns(functools.partial(self.phase_init, phase=phase),
                         functools.partial(self.phase_step, phase=phase), self.client_final)

    def phase_init(self, down: dict[str, Any], cstate: Any, client_id: torch.Tensor, *,
                   phase: tuple[str, int]) -> dict[str, Any]:
        z = torch.zeros((), dtype=self.stats_dtype, device=client_id.device)
        if phase[0] == "classifier":
            return {"gram": z.new_zeros(self.h, self.h), "rhs": z.new_zeros(self.h, self.num_classes), "loss": z}
        second = {"cross": z.new_zeros(self.h, self.f)} if self.cfg.residual_payload == "code" else \
            {"ftr": z.new_zeros(self.f, self.num_classes)}
        return {"gram_f": z.new_zeros(self.f, self.f), **second, "loss": z}

    def phase_step(self, local: dict[str, Any], down: dict[str, Any], batch: dict[str, torch.Tensor], *,
                   phase: tuple[str, int]) -> tuple[dict[str, Any], torch.Tensor]:
        kind, n = phase
        x, y, w = batch["x"], batch["y"], batch["w"]
        omegas = {k.split("/", 1)[1]: v.to(self.stats_dtype) for k, v in down.items() if k.startswith("omega/")}
        w_n = down["W"].to(self.stats_dtype) if kind == "residual" else None
        phi = self.features(down["maps"], omegas, x, n)
        ww = w.to(self.stats_dtype)[:, None]
        y1 = self.one_hot(y, w)
        if kind == "classifier":
            new = {"gram": local["gram"] + phi.T @ (phi * ww), "rhs": local["rhs"] + phi.T @ y1,
                   "loss": local["loss"]}
        else:
            feat = self.act(phi @ down["maps"][f"B{n}"] + down["maps"][f"b{n}"])
            resid = y1 - (phi @ w_n) * ww  # the BROADCAST W_n; padding rows are zero
            new = {"gram_f": local["gram_f"] + feat.T @ (feat * ww), "loss": local["loss"]}
            if self.cfg.residual_payload == "code":
                new["cross"] = local["cross"] + w_n @ resid.T @ feat
            else:
                new["ftr"] = local["ftr"] + feat.T @ resid
        return new, local["loss"]
