"""The answer table through the real paths that judge answers: a two-step GRPO run (TRL's reward call, the RL
stage's guarded wrapper, the logged reward) and held-out exact match. The policy's `generate` is scripted to
write the table's completions, so that what is judged is known; everything after generation is the real run."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "unit" / "reward"))
from answer_table import ROWS  # noqa: E402

from latentalign.model import LatentAlignForCausalLM  # noqa: E402

SMALL = {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
         "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8}


def prompt_of(i: int) -> str:
    return f"Problem {i}: what is the answer?"


@pytest.fixture
def scripted(monkeypatch, tmp_path):
    """(policy dir, table file, generate calls): the policy writes row i's completion for prompt i."""
    from latentalign.training import load_starting_point, save_model_dir

    model, tokenizer = load_starting_point("tiny", overrides=SMALL)
    policy = save_model_dir(model, tokenizer, tmp_path / "policy")
    table = tmp_path / "table.jsonl"
    table.write_text("".join(json.dumps({"prompt": prompt_of(i), "answer": ref}) + "\n"
                             for i, (_, ref, _) in enumerate(ROWS)))
    calls: list[list[int]] = []

    def generate(self, input_ids=None, attention_mask=None, **_):
        rows, completions = [], []
        for ids in input_ids:
            text = tokenizer.decode(ids, skip_special_tokens=True)
            i = next(i for i in range(len(ROWS)) if prompt_of(i) in text)
            rows.append(i)
            completions.append(tokenizer(" " + ROWS[i][0], add_special_tokens=False).input_ids
                               + [tokenizer.eos_token_id])
        calls.append(rows)
        width = max(map(len, completions))
        padded = [c + [tokenizer.pad_token_id] * (width - len(c)) for c in completions]
        return torch.cat([input_ids, torch.tensor(padded, device=input_ids.device)], dim=1)

    monkeypatch.setattr(LatentAlignForCausalLM, "generate", generate)
    return policy, table, calls


def test_grpo_logs_the_table_verdicts_and_exact_match_agrees(tmp_path, scripted):
    from latentalign.rl import load_config, run

    policy, table, calls = scripted
    per_step = 25  # prompts a step, x 2 completions: two steps judge 50 of the table's rows
    cfg = load_config(None, [f"model={policy}", f"output_dir={tmp_path / 'rl'}", f"dataset={table}",
                             f"eval_dataset={table}", f"eval_size={len(ROWS)}", f"dataset_size={len(ROWS)}",
                             "num_generations=2", f"per_device_train_batch_size={2 * per_step}",
                             "max_completion_length=128", "max_steps=2", "logging_steps=1", "save_steps=100",
                             "disable_tqdm=true", "routing_metrics=false",  # generate runs no forward to record
                             'rewards={"math": 1.0}'])
    metrics = run(cfg)
    expected = [float(e) for _, _, e in ROWS]
    logged = [h["rewards/math_accuracy/mean"] for h in metrics["log_history"] if "rewards/math_accuracy/mean" in h]
    rollouts = [c for c in calls if len(c) == 2 * per_step]
    assert len(logged) == 2 and len(rollouts) == 2
    for mean, rows in zip(logged, rollouts):
        assert mean == pytest.approx(sum(expected[i] for i in rows) / len(rows), abs=1e-6)
    assert sum(metrics["reward_failures"]["math_accuracy"].values()) == 0
    share = sum(expected) / len(expected)
    assert metrics["eval_accuracy_before"] == pytest.approx(share) and metrics["eval_accuracy"] == pytest.approx(share)


def test_exact_match_gives_each_row_the_table_verdict(scripted):
    from latentalign import load_model
    from latentalign.eval import exact_match
    from latentalign.training import load_tokenizer

    policy, _, _ = scripted
    model, tokenizer = load_model(policy), load_tokenizer(str(policy))
    verdicts = [exact_match(model, tokenizer, [{"prompt": prompt_of(i), "answer": ref}], max_new_tokens=128,
                            progress=False)["accuracy"] for i, (_, ref, _) in enumerate(ROWS)]
    assert verdicts == [float(e) for _, _, e in ROWS]
