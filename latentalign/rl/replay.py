"""Routing replay for MoE RL: the experts chosen while generating a completion are reused in the training
forward of those tokens (R3 in the literature; verl and NeMo-RL ship it for Megatron, TRL has none).

Why: after the policy moves, or merely between a batched prefill and token-by-token decoding, the router can pick
other experts for the same token than it did in the rollout, so the training forward scores a different network
than the one that sampled. Replay removes that mismatch; measuring without replaying reports how often it occurs.

`RoutingReplay` records each router's choices during `generate` (prefill, then one row per decoded token) through
forward hooks, assembles them into (batch, layers, tokens, top_k) aligned with the training sequence prompt +
completion (-1 where the rollout made no choice: the last token, which generation never feeds back; and on
padding), and, around a training forward, either enforces those choices or only compares with them
(`moe/routing_agreement`). `RolloutLogprobs` keeps the sampled tokens' log-probabilities while generating.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..model.modeling import DeepseekRouter, affinities


class RoutingReplay:
    """Records the routers' choices during `generate` and replays (or only measures against) them in a training
    forward, through forward hooks on the routers: the router itself holds no RL state."""

    def __init__(self, model, enforce: bool = True):
        self.routers = [m for m in model.modules() if isinstance(m, DeepseekRouter)]
        if not self.routers:
            raise ValueError("routing replay needs a model with DeepSeekMoE routers (latentalign's model).")
        self.enforce = enforce
        self.top_k = self.routers[0].top_k
        self._records: list[list[torch.Tensor]] | None = None
        self._active: torch.Tensor | None = None  # the routing being replayed, in the assembled layout
        self._current: torch.Tensor | None = None  # what the next forward replays (the active one, or a cut of it)
        self._agreement = [0, 0]  # tokens whose own choice matched the replayed one, tokens compared

    @contextmanager
    def recording(self):
        records: list[list[torch.Tensor]] = [[] for _ in self.routers]
        handles = [router.register_forward_hook(lambda _m, _i, out, rec=rec: rec.append(out[2].detach()))
                   for router, rec in zip(self.routers, records)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._records = records

    def assemble(self, batch: int, length: int) -> torch.Tensor:
        """The last recording as (batch, layers, length, top_k) expert indices, -1 where none was chosen."""
        if self._records is None:
            raise RuntimeError("nothing recorded: generate inside RoutingReplay.recording() first.")
        if any(not pieces for pieces in self._records):  # a rollout engine outside the model (vLLM)
            raise RuntimeError("nothing recorded: the rollout ran no forward of this model's routers (vLLM routes "
                               "in its own engine); turn routing_replay and routing_metrics off for such rollouts.")
        out = torch.full((batch, len(self.routers), length, self.top_k), -1, dtype=torch.long)
        for layer, pieces in enumerate(self._records):
            steps = torch.cat([p.view(batch, -1, self.top_k).cpu() for p in pieces], dim=1)[:, :length]
            out[:, layer, : steps.shape[1]] = steps
        return out

    @contextmanager
    def replaying(self, routing: torch.Tensor):
        """Around a forward of exactly the assembled layout: enforce (or only measure against) `routing`."""
        self._active = self._current = routing
        # prepend: hooks registered earlier (the expert-load meter) see the experts actually used
        handles = [router.register_forward_hook(self._replay_hook(layer), prepend=True)
                   for layer, router in enumerate(self.routers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._active = self._current = None

    @property
    def active(self) -> bool:
        """Inside `replaying`."""
        return self._active is not None

    @contextmanager
    def narrowed(self, rows: torch.Tensor, cols: slice):
        """Inside `replaying`, around a forward of only those rows and columns of the assembled layout."""
        if self._active is None:
            yield
            return
        self._current = self._active[rows][:, :, cols]
        try:
            yield
        finally:
            self._current = self._active

    def _replay_hook(self, layer: int):
        def hook(router, _inputs, output):
            logits, weights, indices = output
            replay = self._current[:, layer].reshape(-1, self.top_k).to(indices.device)
            if replay.shape != indices.shape:
                raise ValueError(f"routing replay holds {tuple(replay.shape)} expert choices for a forward of "
                                 f"{tuple(indices.shape)}; replay needs the rollout's exact token layout.")
            given = (replay >= 0).all(-1)  # rows the rollout decided
            own, theirs = indices.sort(-1).values, replay.sort(-1).values
            self._agreement[0] += int(((own == theirs).all(-1) & given).sum())
            self._agreement[1] += int(given.sum())
            if not self.enforce:
                return None  # measured only: the forward routes as usual
            chosen = torch.where(given.unsqueeze(-1), replay, indices)
            # The gate values of the replayed experts come from this forward's affinities (so gradients flow).
            replayed = router.gate_weights(affinities(logits, router.config).gather(-1, chosen))
            return logits, torch.where(given.unsqueeze(-1), replayed, weights), chosen

        return hook

    def pop_agreement(self) -> float | None:
        """Share of (token, layer) choices of the training forwards that matched the rollout, since last asked."""
        same, total = self._agreement
        self._agreement = [0, 0]
        return same / total if total else None


class RolloutLogprobs:
    """A logits processor that keeps the log-probability of each sampled token under the sampling distribution
    (temperature applied), holding one (batch, vocab) row at a time."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.last: torch.Tensor | None = None
        self.values: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        if self.last is not None:  # the token just sampled from the previous distribution
            self.values.append(self.last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.last = (scores.float() / self.temperature).log_softmax(-1)
        return scores

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """(batch, generated) log-probs, given generate's output (prompt + completion)."""
        if self.last is not None:
            self.values.append(self.last.gather(-1, sequences[:, -1:]).squeeze(-1))
        return torch.stack(self.values, dim=1) if self.values else sequences.new_zeros((sequences.shape[0], 0))
