"""Routing replay for MoE RL: the experts chosen while generating a completion are reused in the training
forward of those tokens (R3 in the literature; verl and NeMo-RL ship it for Megatron, TRL has none).

Why: after the policy moves, or merely between a batched prefill and token-by-token decoding, the router can pick
other experts for the same token than it did in the rollout, so the training forward scores a different network
than the one that sampled. Replay removes that mismatch; measuring without replaying reports how often it occurs.

`RoutingReplay` records each router's choices during `generate` (prefill, then one row per decoded token),
assembles them into (batch, layers, tokens, top_k) aligned with the training sequence prompt + completion (-1
where the rollout made no choice: the last token, which generation never feeds back), and, around a training
forward, either enforces those choices or only compares with them (`moe/routing_agreement`).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..model.modeling import DeepseekRouter


class RoutingReplay:
    def __init__(self, model, enforce: bool = True):
        self.routers = [m for m in model.modules() if isinstance(m, DeepseekRouter)]
        if not self.routers:
            raise ValueError("routing replay needs a model with DeepSeekMoE routers (latentalign's model).")
        self.enforce = enforce
        self.top_k = self.routers[0].top_k
        self._records: list[list[torch.Tensor]] | None = None

    @contextmanager
    def recording(self):
        for router in self.routers:
            router.record = []
        try:
            yield
        finally:
            self._records = [router.record for router in self.routers]
            for router in self.routers:
                router.record = None

    def assemble(self, batch: int, length: int) -> torch.Tensor:
        """The last recording as (batch, layers, length, top_k) expert indices, -1 where none was chosen."""
        if self._records is None:
            raise RuntimeError("nothing recorded: generate inside RoutingReplay.recording() first.")
        out = torch.full((batch, len(self.routers), length, self.top_k), -1, dtype=torch.long)
        for layer, pieces in enumerate(self._records):
            steps = torch.cat([p.view(batch, -1, self.top_k).cpu() for p in pieces], dim=1)[:, :length]
            out[:, layer, : steps.shape[1]] = steps
        return out

    @contextmanager
    def replaying(self, routing: torch.Tensor):
        """Around a forward of exactly the assembled layout: enforce (or only measure against) `routing`."""
        for layer, router in enumerate(self.routers):
            router.replay = routing[:, layer].reshape(-1, self.top_k)
            router.enforce_replay = self.enforce
        try:
            yield
        finally:
            for router in self.routers:
                router.replay = None

    def pop_agreement(self) -> float | None:
        """Share of (token, layer) choices of the training forwards that matched the rollout, since last asked."""
        same = sum(r.agreement[0] for r in self.routers)
        total = sum(r.agreement[1] for r in self.routers)
        for router in self.routers:
            router.agreement = [0, 0]
        return same / total if total else None


def replay_trainer_class():
    """GRPOTrainer with routing replay: records routing while generating, replays (or measures) in the loss."""
    from trl import GRPOTrainer

    class ReplayGRPOTrainer(GRPOTrainer):
        def __init__(self, *args, routing_replay: RoutingReplay, **kwargs):
            super().__init__(*args, **kwargs)
            self.routing_replay = routing_replay

        def _generate_single_turn(self, *args, **kwargs):
            with self.routing_replay.recording():
                return super()._generate_single_turn(*args, **kwargs)

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            batch, width = output["prompt_ids"].shape[0], output["prompt_ids"].shape[1]
            length = width + output["completion_ids"].shape[1]
            output["routing"] = self.routing_replay.assemble(batch, length).to(output["prompt_ids"].device)
            return output

        def _compute_loss(self, model, inputs):
            with self.routing_replay.replaying(inputs["routing"]):
                return super()._compute_loss(model, inputs)

    return ReplayGRPOTrainer
