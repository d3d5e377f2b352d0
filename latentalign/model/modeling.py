"""DeepSeek-V2 for post-training: Multi-head Latent Attention and DeepSeekMoE on transformers' own code.

Reads top to bottom: routing and balance losses, grouped experts, the MoE block, MLA with its two attention
paths, the decoder, and the causal-LM and reward heads. Every module subclasses its transformers
`deepseek_v2` counterpart and keeps its parameter names, so state dicts move both ways unchanged.

Where this departs from transformers 5.24 (the reasons are in the design facts, §2 and §5):
- MLA decodes with weight absorption over the cached latents instead of re-expanding keys and values
  through `kv_b_proj` at every step, and the cache appends new latents in place instead of concatenating.
  Training and prefill keep the expanded path, with the values zero-padded to the query width so that SDPA
  can use its flash kernels rather than materialise the (B, H, T, T) scores.
- Routed experts run as grouped matrix multiplies over expert-sorted tokens, with no Python loop over experts,
  and a backward that computes the weight gradients in the parameters' own layout.
- These paths round differently from transformers' (logits agree to about 1e-7, not bit for bit); the speed
  they buy is measured in bench/README.md.
- `output_router_logits=True` returns `aux_loss`, the paper's expert-, device- and communication-level
  balance losses (transformers computes none), and `expert_load`, tokens per expert per MoE layer.
- Training can drop tokens beyond a device capacity (off by default).
- Position ids follow the attention mask, so a left-padded row sees the positions it would see alone.
- The reward head pools the last token that the attention mask marks real, whatever the padding side.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast, SequenceClassifierOutputWithPast
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf
from transformers.utils.generic import can_return_tuple

from .compat import cache_kwarg, cache_of, either_cache_name
from .config import LatentAlignConfig

# ----------------------------------------------------------------------------------------------------------
# Routing and balance losses (DeepSeek-V2 §2.2)
# ----------------------------------------------------------------------------------------------------------


def select_experts(
    scores: torch.Tensor, config: LatentAlignConfig, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K experts per token from affinities `scores` (N, E): greedy, device-limited, or bias-corrected.

    Device-limited routing (DeepSeek-V2) first keeps the `topk_group` groups holding the highest affinity,
    masking the other groups' experts to 0, then takes the top-K of what is left. `noaux_tc` (DeepSeek-V3)
    chooses by `scores + bias` (the score-correction bias, E), keeping the groups whose two best biased scores
    sum highest. Returns (weights, indices), each (N, K); the weights are the chosen experts' (unbiased)
    affinities, before `gate_weights` renormalises or scales them.
    """
    if config.topk_method == "noaux_tc":
        choice = scores if bias is None else scores + bias.float()
        if config.n_group > 1:
            n, n_experts = scores.shape
            groups = choice.view(n, config.n_group, n_experts // config.n_group).topk(2, dim=-1).values.sum(-1)
            keep = groups.topk(config.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros(n, config.n_group, dtype=torch.bool, device=scores.device).scatter_(1, keep, True)
            choice = choice.masked_fill(~group_mask.repeat_interleave(n_experts // config.n_group, dim=1), float("-inf"))
        indices = choice.topk(config.num_experts_per_tok, dim=-1, sorted=False).indices
        return scores.gather(1, indices), indices
    if config.topk_method == "group_limited_greedy":
        n, n_experts = scores.shape
        groups = scores.view(n, config.n_group, n_experts // config.n_group)
        keep = groups.amax(dim=-1).topk(config.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros(n, config.n_group, dtype=torch.bool, device=scores.device).scatter_(1, keep, True)
        scores = scores.masked_fill(~group_mask.repeat_interleave(n_experts // config.n_group, dim=1), 0.0)
    return torch.topk(scores, k=config.num_experts_per_tok, dim=-1, sorted=False)


def drop_over_capacity(
    weights: torch.Tensor, indices: torch.Tensor, config: LatentAlignConfig, capacity_factor: float,
    real: torch.Tensor | None = None,
) -> torch.Tensor:
    """Device-level token dropping (§2.2.4): zero the lowest-affinity assignments beyond each device's budget.

    The budget of each of the D device groups is `capacity_factor * N * K / D` assignments, N the real tokens
    (`real`, (N,) bool: padding takes no place and is dropped, so a batch's padding changes no real token).
    Returns the new weights; dropped assignments weigh 0 and so contribute nothing (the shared experts still see
    the token).
    """
    n, k = indices.shape
    d = config.device_groups
    device = (indices // (config.n_routed_experts // d)).reshape(-1)  # (N*K,)
    if real is not None and real.numel() == n:
        device = torch.where(real.to(device.device).repeat_interleave(k), device, d)  # padding: a group apart
        n = int(real.sum())
    budget = max(1, int(capacity_factor * n * k / d))
    flat_w = weights.reshape(-1)
    # Rank each assignment inside its device by affinity: sort by weight (descending), then stably by device.
    order = torch.argsort(-flat_w.detach(), stable=True)
    order = order[torch.argsort(device[order], stable=True)]
    counts = torch.bincount(device, minlength=d + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - starts[device[order]]
    kept = (rank < budget) & (device < d)
    return torch.where(kept, flat_w, torch.zeros_like(flat_w)).view(indices.shape)


@dataclass
class BalanceStats:
    loss: torch.Tensor  # scalar: alpha1 * L_ExpBal + alpha2 * L_DevBal + alpha3 * L_CommBal, summed over layers
    expert_load: torch.Tensor  # (n_moe_layers, E): tokens routed to each expert (real tokens only)


def sequences_of(n_tokens: int, batch_size: int, attention_mask=None, position_ids=None,
                 per_sequence: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(token, sequence, S): the batch's real tokens among its N = B*T (padding, attention_mask 0, is none), the
    sequence of each numbered from 0, and S, the sequences: each row of the batch, split again where its position
    ids restart at 0 on a real token (rows packed into one, TRL's padding-free batches); one sequence of every
    real token if not `per_sequence`. A row without a real token is no sequence."""
    t = n_tokens // batch_size
    device = attention_mask.device if attention_mask is not None else None
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape == (batch_size, t):
        real = attention_mask.bool()
    else:
        real = torch.ones(batch_size, t, dtype=torch.bool, device=device)
    token = real.reshape(-1).nonzero().squeeze(-1)
    if not per_sequence:
        return token, torch.zeros_like(token), int(token.numel() > 0)
    starts = real & (real.cumsum(dim=1) == 1)  # each row's first real token
    if position_ids is not None and position_ids.shape == real.shape:
        starts |= real & (position_ids.to(real.device) == 0)
    sequence = starts.reshape(-1).cumsum(0).index_select(0, token) - 1
    return token, sequence, int(starts.sum())


def balance_loss(
    router_logits: tuple[torch.Tensor, ...],
    config: LatentAlignConfig,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 1,
    biases: list[torch.Tensor | None] | None = None,
    position_ids: torch.Tensor | None = None,
) -> BalanceStats:
    """The balance losses of DeepSeek-V2 eq. 12-20, per sequence, averaged over the sequences, summed over layers.

    `router_logits` holds one (B*T, E) tensor per MoE layer. With T the real tokens of a sequence:
      expert:  f_i = E/(K T) #{t selects i},   P_i = 1/T sum_t s_{i,t},   L = sum_i f_i P_i
      device:  f'_d = mean_{i in d} f_i,       P'_d = sum_{i in d} P_i,   L = sum_d f'_d P'_d
      comm:    f''_d = D/(M T) #{t sent to d},                            L = sum_d f''_d P'_d
    Padding tokens (attention_mask 0) count nowhere, and a row of padding is no sequence; rows packed into one
    (position ids restarting at 0) are sequences apart (`sequences_of`). With `seq_aux: false` (the original
    code's batch-wise loss) the batch's real tokens are counted as one sequence. For sigmoid routing
    (DeepSeek-V3) `biases` holds each layer's score-correction bias (it decides `f`), and P averages the scores
    normalised per token: the sequence-wise balance loss of the V3 report (eq. 17-20), which its configs weight
    by 0.0001. Sums are scattered in fp32 (no autocast: token counts in bf16 lose whole tokens).
    """
    n_experts, top_k = config.n_routed_experts, config.num_experts_per_tok
    d, m = config.device_groups, config.device_topk
    alpha1, alpha2, alpha3 = config.aux_loss_alpha, config.device_aux_loss_alpha, config.comm_aux_loss_alpha
    device = router_logits[0].device
    total = router_logits[0].new_zeros((), dtype=torch.float32)
    token, sequence, n_seq = sequences_of(router_logits[0].shape[0], batch_size, attention_mask, position_ids,
                                          config.seq_aux)
    token, sequence = token.to(device), sequence.to(device)
    n_tok = torch.bincount(sequence, minlength=n_seq).clamp(min=1).float()[:, None]  # (S, 1)

    def per_sequence(values: torch.Tensor) -> torch.Tensor:  # (N, X) -> (S, X): each sequence's sum
        return values.new_zeros(n_seq, values.shape[-1]).index_add_(0, sequence, values.index_select(0, token))

    loads = []
    for logits, bias in zip(router_logits, biases or [None] * len(router_logits)):
        scores = affinities(logits.float(), config)  # (N, E)
        _, idx = select_experts(scores, config, bias)
        if config.scoring_func == "sigmoid":  # DeepSeek-V3 eq. 20: P_i from the scores normalised per token
            scores = scores / scores.sum(dim=-1, keepdim=True)
        chosen = F.one_hot(idx, n_experts).sum(dim=1).float()  # (N, E) in {0, 1}
        counts = per_sequence(chosen)  # (S, E): each sequence's real tokens that chose expert i
        loads.append(counts.sum(dim=0).detach())
        if not n_seq:  # nothing but padding: no loss
            continue
        f = counts * n_experts / (top_k * n_tok)  # (S, E)
        p = per_sequence(scores) / n_tok  # (S, E)
        if alpha1:
            total = total + alpha1 * (f * p).sum(-1).mean()
        if d > 1 and (alpha2 or alpha3):
            p_dev = p.view(-1, d, n_experts // d).sum(-1)  # (S, D)
            if alpha2:
                total = total + alpha2 * (f.view(-1, d, n_experts // d).mean(-1) * p_dev).sum(-1).mean()
            if alpha3:
                sent = chosen.view(-1, d, n_experts // d).amax(-1)  # (N, D): token reaches device d
                f_comm = per_sequence(sent) * d / (m * n_tok)
                total = total + alpha3 * (f_comm * p_dev).sum(-1).mean()
    return BalanceStats(loss=total, expert_load=torch.stack(loads))


def affinities(router_logits: torch.Tensor, config: LatentAlignConfig) -> torch.Tensor:
    """Token-to-expert affinities from the router's logits: softmax (DeepSeek-V2) or sigmoid (DeepSeek-V3)."""
    return router_logits.sigmoid() if config.scoring_func == "sigmoid" else router_logits.softmax(dim=-1)


class DeepseekRouter(hf.DeepseekV2TopkRouter):
    """The gate over the routed experts, in fp32. Returns (logits, gate weights, expert indices).

    With `topk_method: noaux_tc` it holds `e_score_correction_bias` (E,), the buffer DeepSeek-V3 checkpoints
    carry: it shifts which experts are chosen and is moved between optimizer steps by the training stages'
    auxiliary-loss-free balancing (latentalign.training.moe.BiasBalancer), never by gradients.
    Routing replay (latentalign.rl.replay) works through forward hooks on this module and `gate_weights`.
    """

    def __init__(self, config: LatentAlignConfig):
        super().__init__(config)
        self.config = config
        if config.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))

    @property
    def score_bias(self) -> torch.Tensor | None:
        return getattr(self, "e_score_correction_bias", None)

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.view(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states.float(), self.weight.float())  # (N, E)
        weights, indices = select_experts(affinities(router_logits, self.config), self.config, self.score_bias)
        if self.training and self.config.moe_capacity_factor is not None:
            weights = drop_over_capacity(weights, indices, self.config, self.config.moe_capacity_factor,
                                         getattr(self, "real_tokens", None))
        return router_logits, self.gate_weights(weights), indices

    def gate_weights(self, affinities: torch.Tensor) -> torch.Tensor:
        """The gate values of the chosen experts' affinities (N, K). DeepSeek-V2: renormalised to sum to 1 with
        `norm_topk_prob` (and then not scaled, as the original code; transformers ignores the flag), else scaled
        by `routed_scaling_factor`. DeepSeek-V3: renormalised with `norm_topk_prob`, then always scaled."""
        if self.config.norm_topk_prob and self.config.num_experts_per_tok > 1:
            affinities = affinities / (affinities.sum(dim=-1, keepdim=True) + 1e-20)
            if self.config.scoring_func == "softmax":
                return affinities
        return affinities * self.routed_scaling_factor


# ----------------------------------------------------------------------------------------------------------
# Grouped experts
# ----------------------------------------------------------------------------------------------------------


def _weights_aligned(a: torch.Tensor, b: torch.Tensor) -> bool:
    """grouped_mm needs 16-byte aligned rows of the expert weights; odd widths (tiny test models) do not have them.
    The weights' two dims are b's last two (x @ W^T, dy @ W) or a's rows and b's columns (dy^T @ x)."""
    out_dim, in_dim = b.shape[-2:] if b.dim() == 3 else (a.shape[0], b.shape[1])
    per_16_bytes = 16 // b.element_size()
    return out_dim % per_16_bytes == 0 and in_dim % per_16_bytes == 0


@torch.library.custom_op("latentalign::grouped_mm", mutates_args=())
def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`F.grouped_mm(a, b, offs=offs)` as one opaque op, for the CPU.

    Opaque so that `torch.compile` calls the eager kernel, which takes fp32 and bf16, instead of inductor's CPU
    lowering of grouped_mm, which takes bf16 only; and so that the loop over experts for unaligned widths stays
    out of compiled graphs. (2-D a) x (3-D b) -> one product per group of a's rows; (2-D a) x (2-D b) -> one
    (a.rows, b.cols) product per group of the shared dimension, stacked.
    """
    if _weights_aligned(a, b):
        return F.grouped_mm(a, b, offs=offs)
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    if b.dim() == 3:
        return torch.cat([a[s:e] @ b[i] for i, (s, e) in enumerate(zip(starts, ends))])
    return torch.stack([a[:, s:e] @ b[s:e] for s, e in zip(starts, ends)])


@grouped_mm.register_fake
def _(a, b, offs):
    if b.dim() == 3:
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])


class _GroupedLinear(torch.autograd.Function):
    """y[rows of group e] = x[rows of group e] @ w[e]^T for rows sorted by group; `offs` are the cumulative ends.

    `w` keeps the (E, out, in) layout of the parameters, so the weight gradient is computed in that layout,
    dw[e] = dy_e^T @ x_e, instead of as (E, in, out) and then transposed into the parameter's layout (a strided
    copy of every expert weight, each step). torch's own `grouped_mm` autograd has no such choice.
    """

    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        return grouped_mm(x, w.transpose(-2, -1), offs)

    @staticmethod
    def backward(ctx, dy):
        x, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dx = grouped_mm(dy, w, offs) if ctx.needs_input_grad[0] else None
        dw = grouped_mm(dy.t(), x, offs) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x (M, in) rows sorted by expert, w (E, out, in) as nn.Linear stores it, offs (E,) int32 cumulative row
    counts -> (M, out)."""
    if x.dtype != w.dtype:
        x = x.to(w.dtype)
    if x.is_cuda and _weights_aligned(x, w):  # CUDA grouped_mm has its own autograd and compiles in every dtype
        return F.grouped_mm(x, w.transpose(-2, -1), offs=offs)
    return _GroupedLinear.apply(x, w, offs)


EXPERTS_IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")


class GroupedExperts(hf.DeepseekV2Experts):
    """The routed experts as two fused 3-D weights, computed as grouped GEMMs over expert-sorted tokens.

    transformers' `experts_implementation` is honoured: "grouped_mm" (the default) is ours, "eager" (a loop over
    experts) and "batched_mm" are transformers' own; anything else is refused when the model is built.

    `load_state_dict` also reads the original per-expert layout (`E.gate_proj.weight`, ...), the one
    `save_pretrained` writes: the Trainer resumes checkpoints with a plain `load_state_dict(strict=False)`,
    which would otherwise skip the experts silently.
    """

    def __init__(self, config):
        super().__init__(config)
        self.register_load_state_dict_pre_hook(_merge_per_expert_weights)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        if self.config._experts_implementation not in (None, "grouped_mm"):
            return super().forward(hidden_states, top_k_index, top_k_weights)  # transformers' dispatch
        n, k = top_k_index.shape
        if n * k < self.num_experts and hidden_states.device.type == "cpu" and torch.compiler.is_compiling():
            return self._few_tokens(hidden_states, top_k_index, top_k_weights)
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert
        token = order // k  # the token of each sorted assignment
        offs = torch.cumsum(torch.bincount(flat, minlength=self.num_experts), 0).to(torch.int32)
        x = hidden_states.index_select(0, token)  # (N*K, d); its backward, index_add_, beats indexing's index_put_
        gate, up = grouped_linear(x, self.gate_up_proj, offs).chunk(2, dim=-1)  # (N*K, I) each
        # The gate weight scales the intermediate (I wide) rather than the output (d wide; I < d in every
        # DeepSeek-V2 config): the same by linearity of down_proj, with less elementwise work both ways.
        up = up * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(up.dtype)
        y = grouped_linear(self.act_fn(gate) * up, self.down_proj, offs)  # (N*K, d)
        return torch.zeros_like(hidden_states).index_add_(0, token, y.to(hidden_states.dtype))

    def _few_tokens(self, hidden_states, top_k_index, top_k_weights):
        """Each (token, chosen expert) pair as its own matrix-vector product, written as a product and a sum over
        the chosen experts' rows: a compiled decode step on CPU (fewer pairs than experts), where inductor fuses
        the gather of the expert's weights into the sum, so each step reads each pair's expert weights and nothing
        else (an expert two tokens chose, twice). There a grouped GEMM costs more around the products (sorting,
        counting, one call per expert) than the products themselves: the routed experts of the decode benchmark's
        step take 1.5x less time this way (bench/README.md, decode). Eagerly the gather would copy the weights
        first. The choice is made when the graph is traced: a graph compiled with a dynamic token count is guarded
        on it."""
        x = hidden_states.to(self.gate_up_proj.dtype)
        gate, up = (self.gate_up_proj[top_k_index] * x[:, None, None, :]).sum(-1).chunk(2, dim=-1)  # (N, K, I)
        h = self.act_fn(gate) * up * top_k_weights.unsqueeze(-1).to(up.dtype)
        y = (self.down_proj[top_k_index] * h.unsqueeze(-2)).sum(-1).sum(1)  # (N, K, d, I) -> (N, d)
        return y.to(hidden_states.dtype)


def _merge_per_expert_weights(module, state_dict, prefix, *_):
    """`{prefix}{e}.{gate,up,down}_proj.weight` for every expert e -> the fused `gate_up_proj`, `down_proj`. A
    part of them (one shard of a sharded checkpoint, as the Trainer resumes one: a shard at a time) is copied
    into the fused weights' slices in place; an expert number past the model's stays, an unexpected key."""
    if f"{prefix}gate_up_proj" in state_dict:
        return
    n = module.num_experts
    names = {(e, kind): f"{prefix}{e}.{kind}_proj.weight" for e in range(n) for kind in ("gate", "up", "down")}
    present = {key: name for key, name in names.items() if name in state_dict}
    if not present:  # nothing of the experts in this state dict (an adapter, another shard): their weights untouched
        return
    if len(present) == len(names):
        gate = [state_dict.pop(names[e, "gate"]) for e in range(n)]
        up = [state_dict.pop(names[e, "up"]) for e in range(n)]
        down = [state_dict.pop(names[e, "down"]) for e in range(n)]
        state_dict[f"{prefix}gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)])
        state_dict[f"{prefix}down_proj"] = torch.stack(down)
        return
    half = module.gate_up_proj.shape[1] // 2
    with torch.no_grad():
        for (e, kind), name in present.items():
            fused = module.down_proj[e] if kind == "down" else module.gate_up_proj[e]
            part = fused if kind == "down" else fused[:half] if kind == "gate" else fused[half:]
            part.copy_(state_dict.pop(name))


class DeepseekMoE(hf.DeepseekV2Moe):
    """h' = sum_shared FFN_s(u) + sum_i g_i FFN_i(u) (the residual is added by the decoder layer)."""

    def __init__(self, config: LatentAlignConfig):
        nn.Module.__init__(self)
        self.config = config
        self.experts = GroupedExperts(config)
        self.gate = DeepseekRouter(config)
        self.shared_experts = None  # `n_shared_experts: null` (or 0): routed experts only, as in the original code
        if config.n_shared_experts:
            self.shared_experts = hf.DeepseekV2MLP(
                config=config, intermediate_size=config.moe_intermediate_size * config.n_shared_experts
            )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        _, weights, indices = self.gate(hidden_states)
        routed = self.experts(hidden_states.view(-1, shape[-1]), indices, weights).view(shape)
        return routed if self.shared_experts is None else routed + self.shared_experts(hidden_states)


# ----------------------------------------------------------------------------------------------------------
# Multi-head Latent Attention
# ----------------------------------------------------------------------------------------------------------


ABSORBED_KERNELS = ("sdpa", "eager")  # attention kernels whose masks the absorbed path applies itself


def _mask_scores(scores: torch.Tensor, mask: torch.Tensor | None, past: int) -> torch.Tensor:
    """Apply a transformers attention mask (None, bool keep-mask or additive float) to (B, H, S, T) scores."""
    if mask is None:
        s, t = scores.shape[-2:]
        if s == 1:
            return scores
        keep = torch.ones(s, t, dtype=torch.bool, device=scores.device).tril(diagonal=past)
        return scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    mask = mask[..., -scores.shape[-1]:]
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores + mask.to(scores.dtype)


class LatentCacheLayer(DynamicLayer):
    """A DynamicLayer that appends in place instead of concatenating.

    transformers' DynamicLayer allocates and copies the whole cache for every new token, a cost that grows with
    the context and that, with MLA's small per-token work, dominates long-context decoding. Here the latents live
    in buffers with spare room (a quarter as much again as held, so appends cost O(1) amortised), and `keys` and
    `values` are views of their filled part. Whatever replaces those views (crop, beam reordering, batch
    selection) is picked up by the next update, which moves it into fresh buffers.
    """

    _buffers_: tuple[torch.Tensor, torch.Tensor] | None = None  # (keys, values) with room to spare
    _views: tuple[torch.Tensor, torch.Tensor] | None = None  # the views handed out by the last update

    def update(self, key_states, value_states, *args, **kwargs):
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            return super().update(key_states, value_states, *args, **kwargs)  # writes in place would break autograd
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.get_seq_length()
        end = held + key_states.shape[-2]
        if not self._holds_views() or self._buffers_[0].shape[-2] < end:
            self._buffers_ = (self._grown(self.keys, key_states, held, end),
                              self._grown(self.values, value_states, held, end))
        keys, values = self._buffers_
        keys[..., held:end, :].copy_(key_states)
        values[..., held:end, :].copy_(value_states)
        self.keys, self.values = self._views = keys[..., :end, :], values[..., :end, :]
        return self.keys, self.values

    def _holds_views(self) -> bool:
        return self._views is not None and self.keys is self._views[0] and self.values is self._views[1]

    @staticmethod
    def _grown(old: torch.Tensor, new: torch.Tensor, held: int, needed: int) -> torch.Tensor:
        """A buffer shaped like `new` with room for `needed` tokens and a quarter as many again, `old` copied in."""
        buffer = new.new_empty(*new.shape[:-2], needed + max(needed // 4, 64), new.shape[-1])
        if held:
            buffer[..., :held, :].copy_(old)
        return buffer


def append_in_place(cache) -> None:
    """Give a DynamicCache LatentCacheLayers wherever it holds, or would create, plain empty DynamicLayers."""
    if not isinstance(cache, DynamicCache):
        return
    if cache.layer_class_to_replicate is DynamicLayer:
        cache.layer_class_to_replicate = LatentCacheLayer
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and not layer.is_initialized:
            cache.layers[i] = LatentCacheLayer()


class MultiHeadLatentAttention(hf.DeepseekV2Attention):
    """MLA with the expanded path of transformers and a weight-absorbed path for decoding.

    Cache per token per layer: the normalised KV latent c (kv_lora_rank) and the rotated shared RoPE key
    (qk_rope_head_dim), stored by the cache as "keys" (B, 1, T, r) and "values" (B, 1, T, d_r).
    """

    def _use_absorbed(self, cache, query_length: int) -> bool:
        """"auto": absorbed once a cache holds past tokens. A static cache (fixed buffers, compiled decoding)
        is asked nothing about its contents, whose length is a tensor there: one query token means a decode step.
        The absorbed path computes its scores itself and takes the masks of the sdpa and eager kernels; under another
        kernel (flex, flash: a block mask, a 2-D padding mask) "auto" decodes by the expanded path, with that kernel,
        and "absorbed" is refused."""
        mode = self.config.mla_attention
        implementation = self.config._attn_implementation
        if implementation not in ABSORBED_KERNELS:
            if mode == "absorbed":
                raise ValueError(f"mla_attention='absorbed' takes the masks of the {ABSORBED_KERNELS} attention "
                                 f"kernels, not {implementation!r}'s; use mla_attention='auto' or 'expanded'.")
            return False
        if mode == "auto":
            if cache is None:
                return False
            if cache.is_compileable:
                return query_length == 1
            return cache.get_seq_length(self.layer_idx) > 0
        return mode == "absorbed"

    @either_cache_name
    def forward(self, hidden_states, attention_mask=None, cache=None, position_embeddings=None, **kwargs):
        # decided before the cache grows
        w_kv = self._kv_b_weight() if self._use_absorbed(cache, hidden_states.shape[1]) else None
        q_nope, q_pe, latent, k_pe = self._project(hidden_states, cache, position_embeddings, **kwargs)
        if w_kv is None:
            return self._expanded(q_nope, q_pe, latent, k_pe, attention_mask, **kwargs)
        return self._absorbed(q_nope, q_pe, latent, k_pe, attention_mask, w_kv, **kwargs)  # (output, weights)

    def _kv_b_weight(self) -> torch.Tensor | None:
        """kv_b_proj's weight as the layer applies it, for the absorbed path, which reads W^UK and W^UV rather than
        calling the layer: a PEFT LoRA adapter's unmerged update included (GRPO's rollouts decode with the adapter
        being trained). None for a wrapper whose weight cannot be read that way (DoRA and other LoRA variants, a
        LoRA bias, a quantized base): the expanded path, which calls the layer, serves it."""
        layer = self.kv_b_proj
        if type(layer) is nn.Linear:
            return layer.weight
        base = getattr(layer, "base_layer", None)
        if type(base) is not nn.Linear or not all(hasattr(layer, a) for a in ("get_delta_weight", "lora_variant")):
            return None
        weight = base.weight
        if layer.disable_adapters and layer.merged:  # PEFT unmerges when the layer is called, which this path is not
            return None
        if layer.disable_adapters or layer.merged:  # merged adapters are in the base weight; PEFT applies no other
            return weight
        for name in layer.active_adapters:
            if name in layer.lora_A:
                if name in layer.lora_variant or layer.lora_bias.get(name):
                    return None
                weight = weight + layer.get_delta_weight(name).to(weight.dtype)
        return weight

    def _project(self, hidden_states, cache, position_embeddings, **kwargs):
        """Queries (B, H, S, d_nope) and (B, H, S, d_r), and the cached plus new latents (B, 1, T, r) and
        rotated RoPE keys (B, 1, T, d_r): what both attention paths start from."""
        b, s, _ = hidden_states.shape
        r, d_rope = self.kv_lora_rank, self.qk_rope_head_dim
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(b, s, self.num_heads, self.qk_head_dim).transpose(1, 2)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, d_rope], dim=-1)

        latent, k_pe = self.kv_a_proj_with_mqa(hidden_states).split([r, d_rope], dim=-1)
        latent = self.kv_a_layernorm(latent).view(b, 1, s, r)
        k_pe = k_pe.view(b, 1, s, d_rope)
        q_pe, k_pe = hf.apply_rotary_emb(q_pe, k_pe, position_embeddings.to(q_pe.device))
        if cache is not None:
            latent, k_pe = cache.update(latent, k_pe, self.layer_idx, kwargs=kwargs)
        return q_nope, q_pe, latent, k_pe

    def _expanded(self, q_nope, q_pe, latent, k_pe, attention_mask, **kwargs):
        """transformers' path: per-head keys and values up-projected from the latents, then the configured kernel.

        For SDPA the values are zero-padded to the query width (v_head_dim 128 -> 192 in DeepSeek-V2): its flash
        kernels need one head width for q, k and v, and without them the CPU falls back to materialising the
        (B, H, S, T) scores, in the backward pass too. The padding columns are dropped from the output.
        """
        b, h, s, _ = q_nope.shape
        key, value = self.expand_kv(latent, k_pe)  # (B, H, T, d_nope + d_r), (B, H, T, d_v)
        query = torch.cat((q_nope, q_pe), dim=-1)
        implementation = self.config._attn_implementation
        pad = self.qk_head_dim - self.v_head_dim if implementation == "sdpa" else 0
        if pad > 0:
            value = F.pad(value, (0, pad))
        attention = hf.ALL_ATTENTION_FUNCTIONS.get_interface(implementation, hf.eager_attention_forward)
        out, weights = attention(self, query, key, value, attention_mask, scaling=self.scaling,
                                 dropout=self.attention_dropout if self.training else 0.0, **kwargs)  # (B, S, H, D)
        return self.o_proj(out[..., : self.v_head_dim].reshape(b, s, h * self.v_head_dim)), weights

    def _absorbed(self, q_nope, q_pe, latent, k_pe, attention_mask, w_kv, **kwargs):
        """Attention over the latents themselves: W^UK folds into the query, W^UV applies after attention; `w_kv`
        is kv_b_proj's weight (`_kv_b_weight`)."""
        b, h, s, _ = q_nope.shape
        r, d_rope = self.kv_lora_rank, self.qk_rope_head_dim
        latent, k_pe = latent[:, 0], k_pe[:, 0]  # (B, T, r), (B, T, d_r)
        past = latent.shape[1] - s

        # kv_b_proj rows, per head: W^UK (d_nope rows) then W^UV (d_v rows), each over the r latent columns.
        w_kv = w_kv.view(h, self.qk_nope_head_dim + self.v_head_dim, r)
        w_uk, w_uv = w_kv[:, : self.qk_nope_head_dim], w_kv[:, self.qk_nope_head_dim :]
        # Queries in the latent space, scaled here rather than the (B, H, S, T) scores: fewer elements to touch.
        q_lat = torch.einsum("bhsn,hnr->bhsr", q_nope, w_uk) * self.scaling
        q_pe = q_pe * self.scaling
        # Heads fold into columns so the scores are one (B, T, r) x (B, r, H*S) product, as in MQA, the RoPE part
        # added by the same call: the cache's T rows as the product's rows, the layout in which the CPU's GEMM
        # reads them fastest (at 2048 cached tokens, 1.5x faster than the queries' H*S rows against the cache).
        scores = torch.bmm(k_pe, q_pe.reshape(b, h * s, d_rope).transpose(1, 2))
        scores = torch.baddbmm(scores, latent, q_lat.reshape(b, h * s, r).transpose(1, 2)).transpose(1, 2)
        scores = _mask_scores(scores.view(b, h, s, -1), attention_mask, past)
        probs = scores.float().softmax(dim=-1).to(latent.dtype)
        probs = F.dropout(probs, p=self.attention_dropout, training=self.training)
        context = torch.matmul(probs.view(b, h * s, -1), latent).view(b, h, s, r)  # attention over latents
        out = torch.einsum("bhsr,hvr->bshv", context, w_uv).reshape(b, s, h * self.v_head_dim)
        # The attention weights are the same probabilities over positions as the expanded path's (B, H, S, T).
        return self.o_proj(out), probs.view(b, h, s, -1)


# ----------------------------------------------------------------------------------------------------------
# Decoder and models
# ----------------------------------------------------------------------------------------------------------


class DecoderLayer(hf.DeepseekV2DecoderLayer):
    def __init__(self, config: LatentAlignConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = MultiHeadLatentAttention(config=config, layer_idx=layer_idx)
        self.mlp = DeepseekMoE(config) if config.is_moe_layer(layer_idx) else hf.DeepseekV2MLP(config)
        self.input_layernorm = hf.DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = hf.DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class LatentAlignPreTrainedModel(hf.DeepseekV2PreTrainedModel):
    config_class = LatentAlignConfig
    config: LatentAlignConfig
    _no_split_modules = ["DecoderLayer"]  # FSDP's wrapping unit and device_map's indivisible block
    _keep_in_fp32_modules_strict = ["gate.weight", "e_score_correction_bias"]  # the bias moves by 0.001 a step

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DeepseekRouter) and module.score_bias is not None:  # a model made on the meta device
            init.zeros_(module.e_score_correction_bias)  # (FSDP, a checkpoint without it) starts balanced, not random

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True  # GroupedExperts dispatches on it (transformers looks for its decorator in our source)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        chosen = "grouped_mm" if requested_experts is None else requested_experts
        if chosen not in EXPERTS_IMPLEMENTATIONS:
            raise ValueError(f"experts_implementation={chosen!r} is not supported by {type(self).__name__}; use "
                             f"one of {EXPERTS_IMPLEMENTATIONS} (grouped_mm is latentalign's grouped GEMMs).")
        return chosen


@dataclass
class LatentAlignModelOutput(MoeModelOutputWithPast):
    aux_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None


@dataclass
class LatentAlignCausalLMOutput(MoeCausalLMOutputWithPast):
    expert_load: torch.Tensor | None = None


def _capacity_counts_real_tokens(model, attention_mask) -> None:
    """Token dropping's budget counts real tokens (and padding takes none of it): each router gets the batch's
    (N,) mask of real tokens. Kept until the next forward, so a layer recomputed by gradient checkpointing
    during backward drops as its forward did."""
    real = attention_mask.bool().reshape(-1) if attention_mask is not None and attention_mask.dim() == 2 else None
    for layer in model.layers:
        if isinstance(layer.mlp, DeepseekMoE):
            layer.mlp.gate.real_tokens = real


def _positions_from_mask(attention_mask, seq_len: int) -> torch.Tensor | None:
    """Position of each of the last `seq_len` tokens among the real tokens of its row (left padding aware)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -seq_len:]


class LatentAlignModel(LatentAlignPreTrainedModel, hf.DeepseekV2Model):
    def __init__(self, config: LatentAlignConfig):
        LatentAlignPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = hf.DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = hf.DeepseekV2RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @can_return_tuple
    @either_cache_name
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_router_logits=None, **kwargs) -> LatentAlignModelOutput:
        append_in_place(cache)
        if position_ids is None:
            seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            position_ids = _positions_from_mask(attention_mask, seq_len)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        if self.training and self.config.moe_capacity_factor is not None:
            _capacity_counts_real_tokens(self, attention_mask)
        out = hf.DeepseekV2Model.forward(
            self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **cache_kwarg(cache),
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_router_logits=output_router_logits,
            return_dict=True, **kwargs,
        )
        result = LatentAlignModelOutput(**out)
        if output_router_logits and out.router_logits:
            if out.last_hidden_state.requires_grad and not any(r.requires_grad for r in out.router_logits):
                _warn_balance_loss_without_gradient()
            batch = out.last_hidden_state.shape[0]
            biases = [layer.mlp.gate.score_bias for layer in self.layers if isinstance(layer.mlp, DeepseekMoE)]
            stats = balance_loss(out.router_logits, self.config, attention_mask, batch_size=batch, biases=biases,
                                 position_ids=position_ids)
            result.aux_loss, result.expert_load = stats.loss, stats.expert_load
        return result


@functools.cache
def _warn_balance_loss_without_gradient() -> None:
    logging.getLogger(__name__).warning(
        "The balance loss has no gradient: the router logits were computed without one, as reentrant gradient "
        "checkpointing (use_reentrant=True) computes its layers' outputs; the routers get no balance gradient. Use "
        "gradient_checkpointing_kwargs: {use_reentrant: false}.")


class LatentAlignForCausalLM(LatentAlignPreTrainedModel, hf.DeepseekV2ForCausalLM):
    def __init__(self, config: LatentAlignConfig):
        LatentAlignPreTrainedModel.__init__(self, config)
        self.model = LatentAlignModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    @either_cache_name
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, output_router_logits=None,
                **kwargs) -> LatentAlignCausalLMOutput:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_router_logits=output_router_logits,
            return_dict=True, **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(out.last_hidden_state[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            if out.aux_loss is not None and self.config.router_aux_loss_coef:
                loss = loss + self.config.router_aux_loss_coef * out.aux_loss.to(loss.device)
        return LatentAlignCausalLMOutput(
            loss=loss, aux_loss=out.aux_loss, logits=logits, **cache_kwarg(cache_of(out)), hidden_states=out.hidden_states,
            attentions=out.attentions, router_logits=out.router_logits, expert_load=out.expert_load,
        )

    compiled_decode: bool = False  # generate()'s default for `compiled_decode` (see generation.py)
    decode_cache_floor: int | None = None  # compiled decoding's shortest static cache (one bucket for a whole run)

    def generate(self, *args, compiled_decode: bool | None = None, **kwargs):
        """transformers' `generate`, plus `compiled_decode`: our decode loop over a bucketed static latent cache with
        a compiled step (generation.py), where the call allows one; transformers' eager loop otherwise. Same greedy
        tokens either way, and (up to rounding) the same samples for the same seed.

        Sharded by FSDP2 across processes (accelerate's `fully_shard`, which transformers does not recognise), every
        process keeps stepping until all have finished (`synced_gpus`): each forward gathers the layers' shards, so
        a process that stopped early would leave the others waiting in that gather for ever."""
        if kwargs.get("synced_gpus") is None and _sharded_across_processes(self):
            kwargs["synced_gpus"] = True
        if self.compiled_decode if compiled_decode is None else compiled_decode:
            from .generation import compiled_generate

            sequences = compiled_generate(self, args, kwargs)
            if sequences is not None:
                return sequences
        return super().generate(*args, **kwargs)


def _sharded_across_processes(module: nn.Module) -> bool:
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    if not (isinstance(module, FSDPModule) and dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size() > 1


class LikelihoodScale(nn.Module):
    """The learned weight of the sequence log-likelihood in a `score_pooling="likelihood"` reward head."""

    def __init__(self, num_labels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_labels))


class LatentAlignForSequenceClassification(LatentAlignPreTrainedModel):
    """Reward model: one score per sequence. Real tokens are those of `attention_mask`, else those that are not
    padding (always, with `"last_non_pad"`: transformers' rule), else all; the score is read at the last of them
    (`score_pooling="last"`), averaged over them
    (`"mean"`), or read at the last of them plus the learned multiple of the sequence's log-likelihood under
    the language-model head the checkpoint brought (`"likelihood"`).

    Why `"likelihood"`: a reward model started from an SFT model inherits a model that already tells a correct
    reply from a near miss token by token (on the embedded pairs, its log-likelihood ranks every held-out pair
    right), but a score read at the last token has to learn to carry that evidence to the end, which took
    Bradley-Terry hundreds of steps to begin (bench/README.md)."""

    def __init__(self, config: LatentAlignConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = LatentAlignModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        if config.score_pooling == "likelihood":
            if not config.tie_word_embeddings:  # tied: the input embeddings serve as the head
                self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.likelihood_scale = LikelihoodScale(self.num_labels)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LikelihoodScale):
            init.ones_(module.weight)

    def sequence_log_likelihood(self, hidden: torch.Tensor, input_ids: torch.Tensor, real: torch.Tensor):
        """Sum over real tokens (after the first) of log p(token | the tokens before it), in fp32: (B,)."""
        head = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        logits = F.linear(hidden[:, :-1], head).float()
        token = logits.log_softmax(-1).gather(-1, input_ids[:, 1:, None].to(logits.device)).squeeze(-1)
        both = (real[:, 1:] & real[:, :-1]).to(token.dtype)
        return (token * both).sum(1)

    @can_return_tuple
    @either_cache_name
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, **kwargs) -> SequenceClassifierOutputWithPast:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, return_dict=True, **kwargs,
        )
        logits = self.score(out.last_hidden_state)  # (B, T, num_labels)
        batch, length = logits.shape[:2]
        transformers_rule = self.config.score_pooling == "last_non_pad" and input_ids is not None
        if attention_mask is not None and attention_mask.dim() == 2 and not transformers_rule:
            real = attention_mask.to(logits.device).bool()
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = (input_ids != self.config.pad_token_id).to(logits.device)
        else:
            real = torch.ones(batch, length, dtype=torch.bool, device=logits.device)
        if self.config.score_pooling == "mean":
            weights = real.to(logits.dtype).unsqueeze(-1)
            pooled = (logits * weights).sum(1) / weights.sum(1).clamp(min=1)
        else:
            last = (torch.arange(length, device=logits.device) * real).argmax(-1)
            pooled = logits[torch.arange(batch, device=logits.device), last]
        if self.config.score_pooling == "likelihood":
            if input_ids is None:
                raise ValueError("score_pooling='likelihood' scores the tokens themselves: pass input_ids.")
            loglik = self.sequence_log_likelihood(out.last_hidden_state, input_ids, real)
            # in fp32: a sum of hundreds of nats in bf16 lands on a grid of 0.5-2, which ties and flips pairs
            pooled = pooled.float() + self.likelihood_scale.weight.float() * loglik.float()[:, None]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=pooled, **cache_kwarg(cache_of(out)), hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
