"""A first look at the model: train the `tiny` preset from scratch on a built-in text, then generate.

Byte-level tokens (256 bytes + pad/bos/eos) keep this independent of any tokenizer. The run prints the loss
curve, the per-expert load, a greedy continuation decoded with absorbed MLA, and the KV-cache size per token.
"""

from __future__ import annotations

import time

TEXT = """\
Multi-head latent attention compresses the keys and values of every token into one small latent vector.
The cache keeps only that latent and a shared rotary key, so a long context costs little memory.
When the model decodes, each query is projected into the latent space and attends to the latents directly.
A mixture of experts sends every token to a few routed experts and to the shared experts.
The router scores the experts with a softmax and keeps the best ones for each token.
Balance losses keep the experts equally busy, so that no expert is idle and none is overloaded.
Supervised fine-tuning teaches the model to follow the chat format.
Reinforcement learning with group relative advantages then rewards answers that are correct.
"""
PAD, BOS, EOS = 256, 257, 258


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def run(steps: int = 300, batch_size: int = 16, seq_len: int = 64, lr: float = 3e-3, seed: int = 0,
        prompt: str = "Multi-head latent attention", new_tokens: int = 120) -> dict:
    import torch
    from tqdm.auto import tqdm

    from latentalign.model import LatentAlignForCausalLM, model_config

    torch.manual_seed(seed)
    config = model_config("tiny", vocab_size=259, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    model = LatentAlignForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    data = torch.tensor(encode(TEXT))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    print(f"tiny DeepSeek-V2 (MLA + {config.n_routed_experts} routed experts, top-{config.num_experts_per_tok}, "
          f"{config.n_shared_experts} shared): {n_params / 1e6:.2f}M parameters, {len(data)} bytes of text")

    losses, start = [], time.perf_counter()
    model.train()
    for _ in (bar := tqdm(range(steps), desc="train", unit="step")):
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,))
        ids = torch.stack([data[s:s + seq_len] for s in starts])
        out = model(ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(), schedule.step(), optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", aux=f"{out.aux_loss.item():.4f}")
    train_s = time.perf_counter() - start
    load = out.expert_load.sum(0)

    model.eval()
    ids = torch.tensor([encode(prompt)])
    start = time.perf_counter()
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD)
    gen_s = time.perf_counter() - start
    text = decode(generated[0].tolist())

    cache_values = (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers
    mha_values = 2 * config.num_attention_heads * config.qk_nope_head_dim * config.num_hidden_layers
    print(f"\nloss {losses[0]:.3f} -> {sum(losses[-20:]) / 20:.3f} in {steps} steps ({train_s:.1f}s)")
    print("tokens per routed expert (last batch, all MoE layers): " + " ".join(str(int(x)) for x in load))
    print(f"KV cache: {cache_values} values per token ({cache_values * 2} bytes in bf16) vs {mha_values} for "
          f"same-shape MHA ({cache_values / mha_values:.0%})")
    print(f"\ngreedy continuation ({new_tokens} tokens, absorbed-MLA decoding, {new_tokens / gen_s:.0f} tokens/s):")
    print(text)
    return {"first_loss": losses[0], "final_loss": sum(losses[-20:]) / 20, "text": text}
