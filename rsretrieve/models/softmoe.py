"""Soft Mixture-of-Experts layer (Puigcerver et al., ICLR 2024), following vmoe's `SoftRouter`.

Einstein notation used below:
    b batch, m tokens, d width, e experts, p slots per expert, s = e * p slots, h expert hidden width.

    logits[b, m, s]  = < normalize(x[b, m]), scale * normalize(phi[:, s]) >
    dispatch          = softmax over m (tokens) for each slot       -> sums to 1 over tokens
    combine           = softmax over s (all slots) for each token   -> sums to 1 over slots
    slot_in[b, s]     = sum_m dispatch[b, m, s] * x[b, m]           (raw tokens, not normalised)
    slot_out[b, e, p] = expert_e(slot_in[b, e, p])                  (MLP d -> h -> d, GELU)
    y[b, m]           = sum_s combine[b, m, s] * slot_out[b, s]

All experts run as one batched matmul over stacked weights (`torch.baddbmm` on (e, b*p, d)); there
is no Python loop over experts or slots. Each sample is routed on its own (softmax over its own
tokens), so outputs do not depend on the other samples in the batch.

The CSMoE regularisers (paper eq. 18 and 19) are `slot_repulsion_loss` and `entropy_loss`; they take
the router parameter `phi` and the combine weights that `SoftMoE.forward(..., return_weights=True)`
(or `SoftMoE.last_weights` with `record_weights = True`) exposes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SoftMoE", "RoutingWeights", "slot_repulsion_loss", "entropy_loss", "expert_usage", "usage_entropy"]


class RoutingWeights(tuple):
    """(dispatch, combine), each (B, M, E, P): dispatch sums to 1 over M, combine over (E, P)."""

    __slots__ = ()

    def __new__(cls, dispatch: torch.Tensor, combine: torch.Tensor):
        return super().__new__(cls, (dispatch, combine))

    @property
    def dispatch(self) -> torch.Tensor:
        return self[0]

    @property
    def combine(self) -> torch.Tensor:
        return self[1]


class SoftMoE(nn.Module):
    """Soft MoE replacement for a transformer MLP: `num_experts` MLPs (dim -> hidden -> dim, GELU),
    each processing `slots_per_expert` slots.

    Parameters (state_dict names): `phi` (dim, experts, slots_per_expert), `scale` (scalar),
    `fc1_weight` (experts, dim, hidden), `fc1_bias` (experts, hidden), `fc2_weight` (experts, hidden,
    dim), `fc2_bias` (experts, dim). Weights are stored (in, out) so that `x @ W` needs no transpose.
    """

    def __init__(self, dim: int, num_experts: int, slots_per_expert: int, hidden_dim: int | None = None):
        super().__init__()
        if num_experts < 1 or slots_per_expert < 1:
            raise ValueError("num_experts and slots_per_expert must be >= 1")
        hidden_dim = hidden_dim or 4 * dim
        self.dim, self.num_experts, self.slots_per_expert, self.hidden_dim = dim, num_experts, slots_per_expert, hidden_dim
        self.phi = nn.Parameter(torch.empty(dim, num_experts, slots_per_expert))
        self.scale = nn.Parameter(torch.ones(()))
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, hidden_dim))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.record_weights = False
        self.last_weights: RoutingWeights | None = None
        self.reset_parameters()

    @property
    def num_slots(self) -> int:
        return self.num_experts * self.slots_per_expert

    def reset_parameters(self) -> None:
        nn.init.normal_(self.phi, std=1.0 / math.sqrt(self.dim))
        nn.init.ones_(self.scale)
        nn.init.trunc_normal_(self.fc1_weight, std=0.02)
        nn.init.trunc_normal_(self.fc2_weight, std=0.02)
        nn.init.zeros_(self.fc1_bias)
        nn.init.zeros_(self.fc2_bias)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, M, D) -> (B, M, S) logits; cosine similarity token/slot times the learned scale."""
        phi = F.normalize(self.phi.reshape(self.dim, self.num_slots), dim=0) * self.scale
        return torch.matmul(F.normalize(x, dim=-1), phi.to(x.dtype))

    def experts(self, slots: torch.Tensor) -> torch.Tensor:
        """(E, T, D) slot inputs grouped per expert -> (E, T, D): all experts in two batched matmuls."""
        w1, b1 = self.fc1_weight.to(slots.dtype), self.fc1_bias.to(slots.dtype)
        w2, b2 = self.fc2_weight.to(slots.dtype), self.fc2_bias.to(slots.dtype)
        h = F.gelu(torch.baddbmm(b1.unsqueeze(1), slots, w1))
        return torch.baddbmm(b2.unsqueeze(1), h, w2)

    def forward(self, x: torch.Tensor, return_weights: bool = False):
        b, m, d = x.shape
        e, p, s = self.num_experts, self.slots_per_expert, self.num_slots
        logits = self.router_logits(x)  # (b, m, s)
        # softmax in float32 for stability (also under bf16 autocast), then back to x's dtype
        dispatch = torch.softmax(logits, dim=1, dtype=torch.float32).to(x.dtype)
        combine = torch.softmax(logits, dim=2, dtype=torch.float32).to(x.dtype)
        slot_in = torch.bmm(dispatch.transpose(1, 2), x)  # (b, s, d)
        # group slots per expert: (b, e, p, d) -> (e, b*p, d)
        slot_in = slot_in.view(b, e, p, d).transpose(0, 1).reshape(e, b * p, d)
        slot_out = self.experts(slot_in)  # (e, b*p, d)
        slot_out = slot_out.view(e, b, p, d).transpose(0, 1).reshape(b, s, d)
        y = torch.bmm(combine, slot_out)  # (b, m, d)
        if return_weights or self.record_weights:
            weights = RoutingWeights(dispatch.view(b, m, e, p), combine.view(b, m, e, p))
            if self.record_weights:
                self.last_weights = weights
            if return_weights:
                return y, weights
        return y

    def extra_repr(self) -> str:
        return f"dim={self.dim}, experts={self.num_experts}, slots_per_expert={self.slots_per_expert}, hidden={self.hidden_dim}"


# ---------------------------------------------------------------------------------------------
# Regularisers (CSMoE paper, eq. 18 and 19) and usage statistics
# ---------------------------------------------------------------------------------------------


def slot_repulsion_loss(phi: torch.Tensor) -> torch.Tensor:
    """Eq. 18: mean squared cosine similarity between distinct slot embeddings.

    `phi` is a router parameter (D, E, P) or (D, S) (one column per slot). 0 when the slot
    embeddings are mutually orthogonal, 1 when they all coincide; minimising it decorrelates slots.
    """
    cols = F.normalize(phi.reshape(phi.shape[0], -1).float(), dim=0)  # (D, S)
    s = cols.shape[1]
    if s < 2:
        return cols.new_zeros(())
    gram = cols.T @ cols
    off = gram - torch.diag_embed(torch.diagonal(gram))
    return off.pow(2).sum() / (s * (s - 1))


def expert_usage(weights: torch.Tensor) -> torch.Tensor:
    """(…, E, P) routing weights (combine or dispatch, as returned by SoftMoE) -> (E,) share of the
    routing mass that goes to each expert, averaged over all leading dimensions; sums to 1."""
    per_expert = weights.float().sum(dim=-1)  # (..., E)
    per_expert = per_expert.reshape(-1, per_expert.shape[-1]).mean(dim=0)
    return per_expert / per_expert.sum().clamp_min(torch.finfo(per_expert.dtype).tiny)


def usage_entropy(weights: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Shannon entropy (nats) of the expert usage distribution; maximal (log E) when balanced."""
    usage = expert_usage(weights)
    return -(usage * torch.log(usage + eps)).sum()


def entropy_loss(weights: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Eq. 19: negative entropy of the expert usage distribution (combine weights (…, E, P)).

    Minimising it balances expert usage; its minimum, -log(E), is reached at uniform usage, and it
    is 0 when a single expert takes all the routing mass. `eps` keeps log finite for unused experts.
    """
    return -usage_entropy(weights, eps=eps)
