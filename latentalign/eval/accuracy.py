"""Greedy (or sampled) answers to chat prompts, and held-out exact-match accuracy against reference answers.

Prompts are rendered with the tokenizer's chat template and generation prompt, left-padded into batches, and
decoded with `model.generate` (absorbed-MLA decoding for our model).
"""

from __future__ import annotations

from ..reward.answers import has_reference, is_correct


def render_prompts(tokenizer, prompts) -> list[str]:
    texts = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return texts


def end_tokens(model, tokenizer) -> list[int]:
    """The tokens that end a reply: the tokenizer's EOS and those of the model's generation config (a chat
    model whose turn ends with a token of its own lists it there)."""
    ids: list[int] = []
    config = getattr(model, "generation_config", None)
    for source in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        for token in source if isinstance(source, (list, tuple)) else [source]:
            if isinstance(token, int) and token not in ids:
                ids.append(token)
    return ids


def generate_completions(model, tokenizer, prompts, **kwargs) -> list[str]:
    """Completions (special tokens stripped) for chat prompts: strings or lists of messages. With
    `chat=False` the prompts are plain text to continue (the tokenizer adds its special tokens). The keyword
    arguments are `generate_with_ends`'."""
    return generate_with_ends(model, tokenizer, prompts, **kwargs)[0]


def generate_with_ends(model, tokenizer, prompts, *, max_new_tokens: int = 16, batch_size: int = 64,
                       do_sample: bool = False, temperature: float = 1.0, progress: bool = True,
                       desc: str = "generate", chat: bool = True) -> tuple[list[str], list[bool]]:
    """(completions, cut): `cut[i]` is true where completion i reached `max_new_tokens` without an end of
    sequence, so an answer it would have given is missing."""
    import torch
    from tqdm.auto import tqdm

    texts = render_prompts(tokenizer, prompts) if chat else list(prompts)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    stops = end_tokens(model, tokenizer)
    ends = torch.tensor(stops, dtype=torch.long)
    was_training = model.training
    model.eval()
    out: list[str] = []
    cut: list[bool] = []
    try:
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=not progress):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=not chat).to(model.device)
            with torch.no_grad():
                ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                     temperature=temperature if do_sample else None, top_p=None, top_k=None,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=stops or None)
            new = ids[:, batch["input_ids"].shape[1]:].cpu()
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
            ended = torch.isin(new, ends).any(dim=1)
            cut += [bool(c) for c in ~ended & (new.shape[1] >= max_new_tokens)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out, cut


def exact_match(model, tokenizer, rows, *, batch_size: int = 64, max_new_tokens: int = 16, progress: bool = True
                ) -> dict:
    """Greedy pass@1: the share of rows whose final answer equals `row["answer"]`, judged by the one answer
    checker the math reward uses (`latentalign.reward.answers`). Rows with an empty answer (reasoning-gym's tasks
    that only their verifier judges) are left out: no answer equals none."""
    rows = [r for r in rows if has_reference(r["answer"])]
    if not rows:
        return {"accuracy": 0.0, "correct": 0, "n": 0, "cut": 0, "examples": []}
    completions, cut = generate_with_ends(model, tokenizer, [r["prompt"] for r in rows], batch_size=batch_size,
                                          max_new_tokens=max_new_tokens, progress=progress, desc="eval")
    correct = [is_correct(c, r["answer"]) for c, r in zip(completions, rows)]
    return {"accuracy": sum(correct) / max(len(rows), 1), "correct": sum(correct), "n": len(rows), "cut": sum(cut),
            "examples": [{"completion": c, "answer": r["answer"]} for c, r in list(zip(completions, rows))[:5]]}
