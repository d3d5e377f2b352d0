"""Routing replay for MoE RL: the experts chosen while generating a completion are reused in the training
forward of those tokens (R3 in the literature; verl and NeMo-RL ship it for Megatron, TRL has none).

Why: after the policy moves, or merely between a batched prefill and token-by-token decoding, the router can pick
other experts for the same token than it did in the rollout, so the training forward scores a different network
than the one that sampled. Replay removes that mismatch; measuring without replaying reports how often it occurs.

`RoutingReplay` records each router's choices during `generate` (prefill, then one row per decoded token),
assembles them into (batch, layers, tokens, top_k) aligned with the training sequence prompt + completion (-1
where the rollout made no choice: the last token, which generation never feeds back; and on padding), and,
around a training forward, either enforces those choices or only compares with them (`moe/routing_agreement`).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from ..model.modeling import DeepseekRouter


class RoutingReplay:
    def __init__(self, model, enforce: bool = True):
        self.routers = [m for m in model.modules() if isinstance(m, DeepseekRouter)]
        if not self.routers:
            raise ValueError("routing replay needs a model with DeepSeekMoE routers (latentalign's model).")
        self.enforce = enforce
        self.top_k = self.routers[0].top_k
        self._records: list[list[torch.Tensor]] | None = None
        self._active: torch.Tensor | None = None  # the routing being replayed, in the assembled layout

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
        self._active = routing
        self._set(routing)
        for router in self.routers:
            router.enforce_replay = self.enforce
        try:
            yield
        finally:
            self._active = None
            for router in self.routers:
                router.replay = None

    @contextmanager
    def narrowed(self, rows: torch.Tensor, cols: slice):
        """Inside `replaying`, around a forward of only those rows and columns of the assembled layout."""
        if self._active is None:
            yield
            return
        self._set(self._active[rows][:, :, cols])
        try:
            yield
        finally:
            self._set(self._active)

    def _set(self, routing: torch.Tensor) -> None:
        for layer, router in enumerate(self.routers):
            router.replay = routing[:, layer].reshape(-1, self.top_k)

    def pop_agreement(self) -> float | None:
        """Share of (token, layer) choices of the training forwards that matched the rollout, since last asked."""
        same = sum(r.agreement[0] for r in self.routers)
        total = sum(r.agreement[1] for r in self.routers)
        for router in self.routers:
            router.agreement = [0, 0]
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


def _padded_outside(attention_mask: torch.Tensor, completion_width: int) -> bool:
    """Whether every row is left-padded prompt + right-padded completion (real tokens contiguous on both sides of
    the boundary), the layout `score_by_length` may cut."""
    prompt = attention_mask[:, : attention_mask.shape[1] - completion_width]
    completion = attention_mask[:, attention_mask.shape[1] - completion_width :]
    return bool((prompt.flip(1).cumprod(1).sum(1) == prompt.sum(1)).all()
                and (completion.cumprod(1).sum(1) == completion.sum(1)).all())


def replay_trainer_class():
    """GRPOTrainer with routing replay: records routing (and the sampled tokens' log-probs) while generating,
    replays or measures routing in the loss, and logs the rollout/training log-prob gap. Its scoring forwards
    (policy and reference) run on length-sorted micro-batches cut to their own width (`score_by_length`)."""
    from transformers import LogitsProcessorList
    from trl import GRPOTrainer

    class ReplayGRPOTrainer(GRPOTrainer):
        # Rows per scoring forward. A GRPO batch pads every prompt to the longest prompt and every completion to
        # the longest completion; rows sorted by length and scored 32 at a time, each group cut to its own
        # widths, skip most of that padding (22% off a step on the embedded default, bench/README.md).
        scoring_rows = 32

        def __init__(self, *args, routing_replay: RoutingReplay | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.routing_replay = routing_replay
            self._rollout_logps: torch.Tensor | None = None
            self._captured: list[torch.Tensor] | None = None

        def _generate_single_turn(self, *args, **kwargs):
            if self.routing_replay is None:
                return super()._generate_single_turn(*args, **kwargs)
            model = self.accelerator.unwrap_model(self.model)
            recorder = RolloutLogprobs(self.temperature)
            generate = model.generate

            def recording_generate(*gen_args, **gen_kwargs):
                processors = LogitsProcessorList(gen_kwargs.pop("logits_processor", None) or [])
                out = generate(*gen_args, logits_processor=LogitsProcessorList([*processors, recorder]),
                               **gen_kwargs)
                self._rollout_logps = recorder.finish(out)
                return out

            model.generate = recording_generate
            try:
                with self.routing_replay.recording():
                    return super()._generate_single_turn(*args, **kwargs)
            finally:
                del model.generate  # back to the class's method

        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            if self.routing_replay is None:
                return output
            prompt_ids, completion_ids = output["prompt_ids"], output["completion_ids"]
            length = prompt_ids.shape[1] + completion_ids.shape[1]
            routing = self.routing_replay.assemble(prompt_ids.shape[0], length).to(prompt_ids.device)
            # Padding (left of the prompt, after the end of a completion) is neither replayed nor counted in the
            # agreement: no loss reads it, and its routing differs between batched prefill and training at will.
            real = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1).bool()
            output["routing"] = routing.masked_fill(~real[:, None, :, None], -1)
            if self._rollout_logps is not None:  # read, and dropped, by the batch's first training forward
                rollout = completion_ids.new_zeros(completion_ids.shape, dtype=torch.float32)
                width = min(rollout.shape[1], self._rollout_logps.shape[1])
                rollout[:, :width] = self._rollout_logps[:, :width].to(rollout.device)
                output["rollout_logps"] = rollout
                self._rollout_logps = None
            return output

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                               batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                               **extra):
            if any(v is not None for v in extra.values()) or not _padded_outside(attention_mask, logits_to_keep):
                out = super()._get_per_token_logps_and_entropies(  # TRL's own chunking
                    model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy,
                    compute_aux_loss, **extra)
            else:
                out = self.score_by_length(model, input_ids, attention_mask, logits_to_keep, batch_size,
                                           compute_entropy, compute_aux_loss)
            if self._captured is not None:
                self._captured.append(out[0].detach())
            return out

        def score_by_length(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                            compute_entropy=False, compute_aux_loss=False):
            """TRL's per-token log-probs (entropies, aux loss) of the last `logits_to_keep` tokens, computed on
            rows sorted by real length in groups of `scoring_rows`, each group cut to the widest prompt (left
            padding) and the longest completion (right padding) it holds. Positions follow the attention mask,
            so a cut row sees the positions it saw uncut; what the cut drops is padding, scored 0."""
            n, width = input_ids.shape
            prompt_width = width - logits_to_keep
            prompt_len = attention_mask[:, :prompt_width].sum(1)
            completion_len = attention_mask[:, prompt_width:].sum(1).clamp(min=1)
            order = torch.argsort(prompt_len + completion_len, stable=True)
            size = min(batch_size or n, self.scoring_rows)
            logps, entropies, aux = [], [], []
            for start in range(0, n, size):
                rows = order[start : start + size]
                p, c = int(prompt_len[rows].max()), int(completion_len[rows].max())
                cols = slice(prompt_width - p, prompt_width + c)
                narrowed = self.routing_replay.narrowed(rows, cols) if self.routing_replay else nullcontext()
                with narrowed:
                    lp, ent, a = super()._get_per_token_logps_and_entropies(
                        model, input_ids[rows, cols], attention_mask[rows, cols], c, batch_size=len(rows),
                        compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss)
                logps.append(F.pad(lp, (0, logits_to_keep - c)))
                if compute_entropy:
                    entropies.append(F.pad(ent, (0, logits_to_keep - c)))
                if compute_aux_loss:
                    aux.append(a)
            back = torch.argsort(order)  # sorted position of each original row
            return (torch.cat(logps)[back], torch.cat(entropies)[back] if compute_entropy else None,
                    torch.stack(aux).mean() if compute_aux_loss else None)

        def _compute_loss(self, model, inputs):
            # The rollout's log-probs are compared with the training forward's own (no extra forward), and only
            # on a batch's first use: later iterations (num_iterations > 1) score moved weights on purpose.
            rollout = inputs.pop("rollout_logps", None)
            self._captured = [] if rollout is not None else None
            replaying = self.routing_replay.replaying(inputs["routing"]) if self.routing_replay else nullcontext()
            try:
                with replaying:
                    loss = super()._compute_loss(model, inputs)
                if self._captured:
                    self._log_logprob_gap(rollout, self._captured[0], inputs["completion_mask"])
            finally:
                self._captured = None
            return loss

        def _log_logprob_gap(self, rollout, train_logps, mask) -> None:
            """Mean |log p_rollout - log p_train| over completion tokens, the training forward replaying or not
            as configured."""
            m = mask.float()
            gap = ((rollout.to(train_logps.device) - train_logps).abs() * m).sum() / m.sum().clamp(min=1)
            self._metrics["train"]["rollout/logprob_gap"].append(gap.item())

    return ReplayGRPOTrainer
