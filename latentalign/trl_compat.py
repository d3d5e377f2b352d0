"""Every use of TRL's (and the Trainer's) private API, in one place.

The stages extend TRL where its public API has no hook: a training sampler for SFT, four private methods of
`GRPOTrainer` (generation, scoring, the loss), the trainers' metric store, the vLLM weight sync, and instance
patches of a model's `forward` and `generate`. Each name relied on is listed in `RELIED_ON`, and
tests/unit/test_trl_compat.py checks every one against the installed TRL, so that a TRL upgrade that renames
or drops one fails in that test instead of in a run.

Pinned: trl 1.16 (pyproject.toml).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

# (module, class, attribute): the private names below rely on, checked by tests/unit/test_trl_compat.py.
RELIED_ON = (
    ("transformers", "Trainer", "_get_train_sampler"),
    ("trl", "GRPOTrainer", "_generate_single_turn"),
    ("trl", "GRPOTrainer", "_generate_and_score_completions"),
    ("trl", "GRPOTrainer", "_get_per_token_logps_and_entropies"),
    ("trl", "GRPOTrainer", "_compute_loss"),
    ("trl.generation.vllm_generation", "VLLMGeneration", "_iter_named_params"),
    ("trl.generation.vllm_generation", "VLLMGeneration", "sync_weights"),
)
# Instance attributes set in __init__ (checked in the constructor's source).
RELIED_ON_ATTRIBUTES = (
    ("trl", "SFTTrainer", "_metrics"),
    ("trl", "GRPOTrainer", "_metrics"),
    ("trl", "GRPOTrainer", "vllm_generation"),
    ("trl.generation.vllm_generation", "VLLMGeneration", "mode"),
)


def metric_logger(trainer, split: str = "train"):
    """`log(name, value)`: a value averaged into the trainer's next log line (TRL's `_metrics` store)."""
    store = trainer._metrics[split]
    return lambda name, value: store[name].append(value)


def wrap_forward(model, wrapper) -> None:
    """Replace `model.forward` on this instance by `wrapper(original_forward, *args, **kwargs)`."""
    original = model.forward
    model.forward = lambda *args, **kwargs: wrapper(original, *args, **kwargs)


def generate_wrapped(model, wrapper):
    """Within the block, `model.generate(...)` is `wrapper(original_generate, ...)` (an instance patch; blocks
    nest, the innermost wrapper called first)."""
    original = model.generate
    return instance_patch(model, "generate", lambda *args, **kwargs: wrapper(original, *args, **kwargs))


@contextmanager
def instance_patch(obj, name: str, value):
    """`obj.name` is `value` within the block, then what it was before (an instance attribute or the class's)."""
    own = vars(obj)
    had, previous = name in own, own.get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, previous)
        else:
            delattr(obj, name)


def with_train_sampler(trainer_cls, make_sampler, name: str):
    """`trainer_cls` whose training sampler is `make_sampler(trainer, dataset)`, or the Trainer's own where that
    returns None."""

    class WithSampler(trainer_cls):
        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            sampler = make_sampler(self, dataset)
            return sampler if sampler is not None else super()._get_train_sampler(train_dataset)

    WithSampler.__name__ = WithSampler.__qualname__ = name
    return WithSampler


def wrap_vllm_weights(trainer, mapping) -> bool:
    """Route TRL's vLLM weight sync through `mapping(named_params) -> named_params`. False without vLLM."""
    generation = getattr(trainer, "vllm_generation", None)
    if generation is None or not hasattr(generation, "_iter_named_params"):
        return False
    original = generation._iter_named_params

    def streamed():
        for name, tensor in mapping(original()):
            generation.latentalign_last_weight = name  # read by after_vllm_sync when a load fails
            yield name, tensor

    generation._iter_named_params = streamed
    return True


def vllm_engine(trainer):
    """("colocate", TRL's `vllm.LLM`) or ("server", TRL's `VLLMClient`) of a GRPO trainer with vLLM; None without
    vLLM or on a process that holds no engine (server mode, not the main process). `llm` and `vllm_client` are
    set by `VLLMGeneration._init_vllm`."""
    generation = getattr(trainer, "vllm_generation", None)
    if generation is None:
        return None
    if generation.mode == "colocate":
        return "colocate", generation.llm
    client = getattr(generation, "vllm_client", None)
    return ("server", client) if client is not None else None


def after_vllm_sync(trainer, check, failed=None) -> bool:
    """Call `check()` after each of TRL's vLLM weight syncs, and before a rollout that no check has preceded
    (TRL syncs before the first rollout, so that is one check); `failed(error, last_weight_name)` sees a sync
    that raised (and may raise something clearer). False without vLLM."""
    generation = getattr(trainer, "vllm_generation", None)
    if generation is None:
        return False
    sync, generate = generation.sync_weights, generation.generate
    pending = [True]

    def synced(*args, **kwargs):
        generation.latentalign_last_weight = None
        try:
            out = sync(*args, **kwargs)
        except Exception as err:
            if failed is not None:
                failed(err, generation.latentalign_last_weight)
            raise
        check()
        pending[0] = False
        return out

    def generating(*args, **kwargs):
        if pending[0]:
            check()
            pending[0] = False
        return generate(*args, **kwargs)

    generation.sync_weights, generation.generate = synced, generating
    return True


class GRPOHooks:
    """Mixed in before `trl.GRPOTrainer` (see `grpo_hook_trainer`): TRL's private steps call overridable hooks.

    - `generating()`: a context manager around each rollout generation;
    - `after_rollout(output)`: the batch dict of `_generate_and_score_completions`, returned (changed);
    - `after_rewards(rewards_per_func)`: every process's completions scored by each reward function (NaN where
      one said None), as TRL gathered them, returned (changed);
    - `score(model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss)`:
      the per-token log-probs (entropies, aux loss) TRL computes, for layouts `can_score` accepts (`trl_score`
      is TRL's own); `on_scored(logps)` sees every result;
    - `loss_context(inputs)`: a context manager around each loss computation;
    - `old_logps_context(attention_mask, logits_to_keep)`: a context manager around the policy's scoring forward
      of a fresh batch, which TRL runs for the importance ratio where a batch serves more than one update
      (`num_iterations` > 1, or `steps_per_generation` beyond the accumulation).
    """

    @contextmanager
    def generating(self):
        yield

    def after_rollout(self, output: dict) -> dict:
        return output

    def after_rewards(self, rewards_per_func):
        return rewards_per_func

    def can_score(self, attention_mask, logits_to_keep, extra: dict) -> bool:
        return False

    def score(self, *args, **kwargs):
        raise NotImplementedError

    def trl_score(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
                  compute_aux_loss=False, **extra):
        """TRL's own scoring forward."""
        return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                          batch_size, compute_entropy, compute_aux_loss, **extra)

    def on_scored(self, logps) -> None:
        pass

    @contextmanager
    def loss_context(self, inputs):
        yield

    @contextmanager
    def old_logps_context(self, attention_mask, logits_to_keep):
        yield

    # -- TRL's private methods, each handing over to a hook ---------------------------------------------------------

    def _generate_single_turn(self, *args, **kwargs):
        with self.generating():
            return super()._generate_single_turn(*args, **kwargs)

    _old_logps_next = False  # the next scoring of the policy is TRL's old log-probs of a fresh batch

    def _generate_and_score_completions(self, inputs):
        # TRL's condition for scoring the old log-probs, whose forward comes before the reference's
        generate_every = self.args.steps_per_generation * self.num_iterations
        self._old_logps_next = bool(self.args.gradient_accumulation_steps % generate_every
                                    or (self.use_vllm and self.vllm_importance_sampling_correction))
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._old_logps_next = False
        return self.after_rollout(output)

    def _calculate_rewards(self, *args, **kwargs):
        return self.after_rewards(super()._calculate_rewards(*args, **kwargs))

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **extra):
        around = nullcontext()
        if self._old_logps_next and model is self.model:
            self._old_logps_next = False
            around = self.old_logps_context(attention_mask, logits_to_keep)
        with around:
            if self.can_score(attention_mask, logits_to_keep, extra):
                out = self.score(model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy,
                                 compute_aux_loss)
            else:
                out = self.trl_score(model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy,
                                     compute_aux_loss, **extra)
        self.on_scored(out[0])
        return out

    def _compute_loss(self, model, inputs):
        with self.loss_context(inputs):
            return super()._compute_loss(model, inputs)


def grpo_hook_trainer():
    """`GRPOHooks` over the installed `trl.GRPOTrainer`."""
    from trl import GRPOTrainer

    return type("GRPOHookTrainer", (GRPOHooks, GRPOTrainer), {"__module__": __name__})
