"""GRPO rollout speed: the same GRPO run with our model and with transformers' DeepseekV2ForCausalLM.

Same weights, same prompts, same sampling; completions forced to `--length` tokens (512 by default) so both
models generate the same number of tokens. Ours runs twice: eager decoding, and `compiled_decode` (its
compilation timed apart, before the run). Each run makes `--steps` GRPO steps on TRL's GRPOTrainer; the time
spent inside `model.generate` is measured, and rollout tokens/s reported as a ratio ours / transformers.

    .venv/bin/python bench/grpo_rollout.py [--length 512] [--steps 1]

Config: hidden 512, 16 heads, kv_lora_rank 128, qk_nope 64, rope 32, v 64, 4 layers, 16 routed experts top-2,
1 shared (the mid-size config of the decode benchmark). Writes bench/results/grpo_rollout.json.
"""

import argparse
import sys
import tempfile
import time

import torch

from common import mid_config, twin_models, variant_name, write_result

SMOKE = ["--length", "4", "--steps", "1"]


def timed_grpo(model, tokenizer, rows, length: int, steps: int, out_dir: str) -> dict:
    from trl import GRPOConfig, GRPOTrainer

    from latentalign.data import to_dataset

    spent = {"seconds": 0.0, "tokens": 0}
    generate = model.generate

    def timing_generate(*args, **kwargs):
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        spent["seconds"] += time.perf_counter() - start
        prompt_len = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[1]
        spent["tokens"] += out[:, prompt_len:].numel()
        return out

    model.generate = timing_generate
    args = GRPOConfig(output_dir=out_dir, num_generations=4, per_device_train_batch_size=8, max_steps=steps,
                      max_completion_length=length, generation_kwargs={"min_new_tokens": length}, beta=0.0,
                      learning_rate=1e-6, report_to="none", use_cpu=not torch.cuda.is_available(),
                      bf16=torch.cuda.is_available(), gradient_checkpointing=False, save_strategy="no",
                      logging_steps=1, router_aux_loss_coef=0.0, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=[lambda prompts, completions, **_: [0.0] * len(completions)],
                          args=args, train_dataset=to_dataset(rows), processing_class=tokenizer)
    compile_s = None
    if getattr(model, "compiled_decode", False):
        # The step compiles before the run, at the rollouts' cache bucket, and after the trainer is built: the
        # trainer wraps the model's forward, which a step compiled before would see changed and compile again.
        start = time.perf_counter()
        prompt = torch.randint(3, model.config.vocab_size, (8, 45))
        generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=length, min_new_tokens=length,
                 do_sample=True, pad_token_id=tokenizer.pad_token_id)
        compile_s = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    return {"rollout_tokens": spent["tokens"], "rollout_seconds": round(spent["seconds"], 2),
            "rollout_tokens_per_s": round(spent["tokens"] / spent["seconds"], 1), "run_seconds": round(total, 1),
            **({"compile_seconds": compile_s} if compile_s is not None else {})}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args(argv)
    length, steps = args.length, args.steps

    from latentalign.data import default_tokenizer, load_rows

    tokenizer = default_tokenizer()
    ours, theirs = twin_models(mid_config())
    rows, _ = load_rows("arithmetic-rl", size=64, formats=("rl",))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        compiled = twin_models(mid_config())[0]
        compiled.compiled_decode = True  # what the RL stage's `compiled_decode: true` sets
        for name, model in (("transformers", theirs), ("latentalign", ours), ("latentalign_compiled", compiled)):
            results[name] = timed_grpo(model, tokenizer, rows, length, steps, f"{tmp}/{name}")
            print(name, results[name], flush=True)
    results["speedup"] = round(results["latentalign"]["rollout_tokens_per_s"]
                               / results["transformers"]["rollout_tokens_per_s"], 2)
    results["compiled_over_eager"] = round(results["latentalign_compiled"]["rollout_tokens_per_s"]
                                           / results["latentalign"]["rollout_tokens_per_s"], 2)
    results.update(completion_length=length, steps=steps, batch="8 completions (2 prompts x 4)",
                   device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (2 cores)")
    write_result("grpo_rollout", results, variant_name(argv))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
