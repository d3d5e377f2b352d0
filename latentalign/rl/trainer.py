"""The RL stage's GRPO trainer: TRL's GRPOTrainer with five additions, each a class of its own.

- `RoutingReplayHooks`: records the rollout's routing while generating and replays (or measures) it in the loss
  and in the old log-probs' forward of a batch that serves several updates;
- `RolloutLogprobGap`: keeps the sampled tokens' log-probs and logs `rollout/logprob_gap` against the training
  forward's own (no extra forward; only on a batch's first use, as later iterations score moved weights);
- `RowSeededRollouts`: samples each completion from noise keyed by (seed, step, its row in the global batch), so
  the rollouts are the same on any number of processes (sampling.py);
- `LengthSortedScoring`: the scoring forwards (policy and reference) on rows sorted by length, 32 at a time,
  each group cut to its own widths, instead of one forward padded to the longest prompt and completion (22% off
  a step on the embedded default, bench/README.md);
- `FailedScoresOut`: a completion that a reward failed to score (an exception, a timeout: `guarded`'s
  `last_failed`) is unscored as a whole, out of its group's baseline. TRL sums the rewards that scored, which is
  right for a reward's own None (math on a code row) but scored a timed-out answer check beside `format` as a
  wrong answer.

They reach TRL only through `trl_compat.grpo_hook_trainer()`'s hooks; `grpo_trainer_class()` composes them.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext

import torch
import torch.nn.functional as F

from .replay import RolloutLogprobs, RoutingReplay


class RoutingReplayHooks:
    routing_replay: RoutingReplay | None = None

    @contextmanager
    def generating(self):
        with super().generating(), (self.routing_replay.recording() if self.routing_replay else nullcontext()):
            yield

    def after_rollout(self, output: dict) -> dict:
        output = super().after_rollout(output)
        if self.routing_replay is None:
            return output
        output["routing"] = self._rollout_routing(torch.cat([output["prompt_mask"], output["completion_mask"]], 1))
        return output

    def _rollout_routing(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last rollout's routing in the layout of prompt + completion."""
        routing = self.routing_replay.assemble(*attention_mask.shape).to(attention_mask.device)
        # Padding (left of the prompt, after the end of a completion) is neither replayed nor counted in the
        # agreement: no loss reads it, and its routing differs between batched prefill and training at will.
        return routing.masked_fill(~attention_mask.bool()[:, None, :, None], -1)

    @contextmanager
    def old_logps_context(self, attention_mask, logits_to_keep):
        # The importance ratio's denominator scores the network the rollout sampled from, as the loss will; the
        # reference's forward routes on its own (a model of its own, or the adapters off).
        with super().old_logps_context(attention_mask, logits_to_keep), (
                self.routing_replay.replaying(self._rollout_routing(attention_mask)) if self.routing_replay
                else nullcontext()):
            yield

    _replay_open: ExitStack | None = None  # the training step's: a replay entered there ends after its backward

    def training_step(self, model, inputs, num_items_in_batch=None):
        with ExitStack() as stack:
            self._replay_open = stack
            try:
                return super().training_step(model, inputs, num_items_in_batch)
            finally:
                self._replay_open = None

    @contextmanager
    def loss_context(self, inputs):
        if self._replay_through_backward() and self._replay_open is not None:
            # Open until the step's backward has run: gradient checkpointing recomputes the layers there, and
            # they must route as the forward did.
            self._replay_open.enter_context(self.routing_replay.replaying(inputs["routing"]))
            replaying = nullcontext()
        else:
            replaying = self.routing_replay.replaying(inputs["routing"]) if self.routing_replay else nullcontext()
        with super().loss_context(inputs), replaying:
            yield

    def can_score(self, attention_mask, logits_to_keep, extra: dict) -> bool:
        # A checkpointed loss forward is recomputed in backward, after a narrowed group's replay has moved on:
        # it runs as one forward of the whole batch, whose replay stays in place.
        if self._replay_through_backward() and torch.is_grad_enabled():
            return False
        return super().can_score(attention_mask, logits_to_keep, extra)

    def _replay_through_backward(self) -> bool:
        """Replay enforced under gradient checkpointing (measured only, the recompute may route afresh)."""
        return bool(self.routing_replay and self.routing_replay.enforce and self.args.gradient_checkpointing)

    def narrowed(self, rows, cols):
        return self.routing_replay.narrowed(rows, cols) if self.routing_replay else super().narrowed(rows, cols)

    def trl_score(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, *args, **kwargs):
        if self.routing_replay is not None and self.routing_replay.active:
            batch_size = None  # TRL's chunks of rows would not match the replayed layout: one forward of it all
        return super().trl_score(model, input_ids, attention_mask, logits_to_keep, batch_size, *args, **kwargs)


class RolloutLogprobGap:
    """`rollout/logprob_gap`: the mean |log-prob| gap per completion token between the rollout's sampling and the
    training forward, on the weights that sampled it only: a generation batch's first use (not a later iteration)
    and its slices trained in the optimizer step right after it (with steps_per_generation above
    gradient_accumulation_steps, later slices meet moved weights)."""
    logprob_gap: bool = False
    _rollout_logps: torch.Tensor | None = None
    _scored: list | None = None
    _slices_left: int = 0  # micro-batches of the generation batch before the next optimizer step

    @contextmanager
    def generating(self):
        if not self.logprob_gap:
            with super().generating():
                yield
            return
        from transformers import LogitsProcessorList

        from ..trl_compat import generate_wrapped

        recorder = RolloutLogprobs(self.temperature)

        def recording(generate, *args, **kwargs):
            processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
            out = generate(*args, logits_processor=LogitsProcessorList([*processors, recorder]), **kwargs)
            self._rollout_logps = recorder.finish(out)
            return out

        with super().generating(), generate_wrapped(self.accelerator.unwrap_model(self.model), recording):
            yield

    def after_rollout(self, output: dict) -> dict:
        output = super().after_rollout(output)
        if self._rollout_logps is not None:  # read, and dropped, by the batch's first training forward
            completion_ids = output["completion_ids"]
            rollout = completion_ids.new_zeros(completion_ids.shape, dtype=torch.float32)
            width = min(rollout.shape[1], self._rollout_logps.shape[1])
            rollout[:, :width] = self._rollout_logps[:, :width].to(rollout.device)
            output["rollout_logps"] = rollout
            self._rollout_logps = None
            self._slices_left = self.args.gradient_accumulation_steps
        return output

    def on_scored(self, logps: torch.Tensor) -> None:
        super().on_scored(logps)
        if self._scored is not None:
            self._scored.append(logps.detach())

    @contextmanager
    def loss_context(self, inputs):
        rollout = inputs.pop("rollout_logps", None)
        if rollout is not None:
            rollout, self._slices_left = (rollout if self._slices_left > 0 else None), self._slices_left - 1
        self._scored = [] if rollout is not None else None
        try:
            with super().loss_context(inputs):
                yield
            if self._scored:
                mask = inputs["completion_mask"].float()
                gap = ((rollout.to(self._scored[0].device) - self._scored[0]).abs() * mask).sum()
                self.log_metric("rollout/logprob_gap", (gap / mask.sum().clamp(min=1)).item())
        finally:
            self._scored = None


class RowSeededRollouts:
    row_seeded_sampling: bool = False
    EVAL_CALLS = 1 << 20
    _next_call: tuple = (None, 0)  # ((step, training), the next generate call's number in that step)

    @contextmanager
    def generating(self):
        if not self.row_seeded_sampling:
            with super().generating():
                yield
            return
        from .sampling import row_seeded_sampling

        model = self.accelerator.unwrap_model(self.model)
        when = (self.state.global_step, self.model.training)
        # A step's later rollouts (a multi-turn episode's next turn) go on from its earlier ones' call numbers; an
        # evaluation's draw noise of their own.
        first_call = self._next_call[1] if self._next_call[0] == when else 0 if when[1] else self.EVAL_CALLS
        with super().generating(), row_seeded_sampling(model, self.args.seed, when[0],
                                                       self.accelerator.process_index, first_call) as calls:
            yield
        self._next_call = (when, calls[0])


def padded_outside(attention_mask: torch.Tensor, completion_width: int) -> bool:
    """Whether every row is left-padded prompt + right-padded completion (real tokens contiguous on both sides of
    the boundary), the layout `LengthSortedScoring` may cut."""
    prompt = attention_mask[:, : attention_mask.shape[1] - completion_width]
    completion = attention_mask[:, attention_mask.shape[1] - completion_width :]
    return bool((prompt.flip(1).cumprod(1).sum(1) == prompt.sum(1)).all()
                and (completion.cumprod(1).sum(1) == completion.sum(1)).all())


class LengthSortedScoring:
    scoring_rows = 32  # rows per scoring forward

    def can_score(self, attention_mask, logits_to_keep, extra: dict) -> bool:
        return not any(v is not None for v in extra.values()) and padded_outside(attention_mask, logits_to_keep)

    def narrowed(self, rows, cols):
        return nullcontext()

    def score(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
              compute_aux_loss=False):
        """TRL's per-token log-probs (entropies, aux loss) of the last `logits_to_keep` tokens, computed on rows
        sorted by real length in groups of `scoring_rows`, each group cut to the widest prompt (left padding)
        and the longest completion (right padding) it holds. Positions follow the attention mask, so a cut row
        sees the positions it saw uncut; what the cut drops is padding, scored 0."""
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
            with self.narrowed(rows, cols):
                lp, ent, a = self.trl_score(model, input_ids[rows, cols], attention_mask[rows, cols], c,
                                            batch_size=len(rows), compute_entropy=compute_entropy,
                                            compute_aux_loss=compute_aux_loss)
            logps.append(F.pad(lp, (0, logits_to_keep - c)))
            if compute_entropy:
                entropies.append(F.pad(ent, (0, logits_to_keep - c)))
            if compute_aux_loss:
                aux.append(a)
        back = torch.argsort(order)  # sorted position of each original row
        return (torch.cat(logps)[back], torch.cat(entropies)[back] if compute_entropy else None,
                torch.stack(aux).mean() if compute_aux_loss else None)


class FailedScoresOut:
    def after_rewards(self, rewards_per_func):
        rewards_per_func = super().after_rewards(rewards_per_func)
        # a reward weighed 0 (logged only) decides no sample's score: its failures unscore nothing
        marks = [f.last_failed for f, w in zip(self.reward_funcs, self.reward_weights.tolist())
                 if getattr(f, "last_failed", None) is not None and w != 0]
        if not marks or len({len(m) for m in marks}) != 1:
            return rewards_per_func
        from accelerate.utils import gather

        local = torch.tensor([any(row) for row in zip(*marks)], dtype=rewards_per_func.dtype,  # as TRL gathers
                             device=rewards_per_func.device)
        failed = gather(local) > 0  # in the order TRL gathered the scores: process by process
        if failed.numel() != rewards_per_func.shape[0] or not failed.any():
            return rewards_per_func
        return rewards_per_func.masked_fill(failed[:, None], float("nan"))


def grpo_trainer_class():
    """`LatentAlignGRPOTrainer(..., routing_replay=None, logprob_gap=False, row_seeded_sampling=False)`:
    GRPOTrainer with the five above."""
    from ..trl_compat import grpo_hook_trainer, metric_logger

    base = grpo_hook_trainer()

    class LatentAlignGRPOTrainer(RoutingReplayHooks, RolloutLogprobGap, RowSeededRollouts, LengthSortedScoring,
                                 FailedScoresOut, base):
        def __init__(self, *args, routing_replay: RoutingReplay | None = None, logprob_gap: bool = False,
                     row_seeded_sampling: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.routing_replay, self.logprob_gap = routing_replay, logprob_gap
            self.row_seeded_sampling = row_seeded_sampling
            self.log_metric = metric_logger(self)

    return LatentAlignGRPOTrainer
