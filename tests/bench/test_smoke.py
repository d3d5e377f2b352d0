"""Every benchmark script runs at its smallest size (its SMOKE options) and records through the one harness."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench"
sys.path.insert(0, str(BENCH))
run_all = importlib.import_module("run_all")

# What each script must have measured, beyond the harness's own fields: a check that fails if it measured nothing.
CHECKS = {
    "sft_accuracy": lambda r: r["steps"] == 2 and 0 <= r["held_out_exact_match"] <= 1 and r["held_out_prompts"] == 4,
    "reward_accuracy": lambda r: r["steps"] == 2 and r["held_out_pairs"] == 4 and r["sft_seconds"] > 0
    and sum(k["n"] for k in r["by_rejected_kind"].values()) == 4 == r["before_training"]["n"],
    "rl_accuracy": lambda r: r["steps"] == 1 and r["held_out_prompts"] == 4 and r["rl_stage_seconds"] > 0
    and 0 < r["rollout_seconds"] <= r["rl_stage_seconds"],
    "v3_balance": lambda r: len(runs := [v for k, v in r.items() if k.startswith("seed ")]) == 2
    and all(0 <= row["held_out_exact_match"] <= 1 and min(row["max_load_ratio_first_step"]) >= 1 for row in runs),
    "decode": lambda r: set(r["contexts"]) == {"8", "16"} and r["contexts"]["16"]["latentalign"]["decode_tokens_per_s"] > 0
    and r["contexts"]["16"]["compiled_same_tokens_as_eager"] and 0 < r["contexts"]["16"]["compiled"]["of_floor"]
    and r["machine_rates"]["read_gb_per_s"] > 0,
    "gpu": lambda r: r["training"]["latentalign"]["tokens_per_s"] > 0 and r["decode"]["compiled_same_tokens_as_eager"]
    and r["decode"]["transformers"]["decode_tokens_per_s"] > 0 and "skipped" in r["vllm"],
    "train_speed": lambda r: set(r["models"]) == {"latentalign", "transformers_grouped_mm", "transformers_eager"}
    and all(m["tokens_per_s"] > 0 for m in r["models"].values()),
    "kv_cache": lambda r: all(r[k]["ours_matches_table1"] and r[k]["mha_matches_table1"]
                              for k in ("mid_size", "deepseek-v2-lite", "deepseek-v2")),
    "memory": lambda r: all(m["step_peak_mib"] > 0 for m in r["models"].values()),
    "grpo_rollout": lambda r: r["latentalign"]["rollout_tokens"] == r["transformers"]["rollout_tokens"]
    == r["latentalign_compiled"]["rollout_tokens"] > 0 and r["compiled_over_eager"] > 0,
    "vllm_peer": lambda r: (row := r["models"]["tiny"]["configs"]["2x4"])["ours"]["tokens_per_s"] > 0
    and ("skipped" in r.get("vllm", {}) or row["vllm"]["tokens_per_s"] > 0 and 0 <= row["greedy_agreement_with_vllm"] <= 1),
    "code_reward": lambda r: r["programs"] == 2 and r["failed_canonical_solutions"] == {"reference": 0, "current": 0},
    "quickstart": lambda r: r["rl_resumed_from"] is not None and r["final_weights_max_abs_diff"] <= 1e-5,
    "recipe_seeds": lambda r: r["summary"]["sft"]["accuracy"]["n"] == 16 and r["summary"]["reward"]["pairwise"]
    and set(r["gains"]["rl - sft"]["accuracy"]["by_seed"]) == {"0"},
}
# the tiny chain twice with a kill -9, as the slow recipe test; a recipe over seeds, and the training-speed
# script, which at their smallest sizes still take 20 s each (the default suite stays under 10 minutes in CI)
SLOW = {"quickstart", "recipe_seeds", "train_speed"}


def test_every_script_is_run_by_make_bench_and_has_a_smoke_size():
    scripts = {p.stem for p in BENCH.glob("*.py")} - {"common", "run_all"}
    assert scripts == set(run_all.SCRIPTS) == set(CHECKS)
    for name in scripts:
        module = importlib.import_module(name)
        assert isinstance(module.SMOKE, list) and callable(module.main), name


def has_commit(ref: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{ref}^{{commit}}"], cwd=BENCH, capture_output=True).returncode == 0


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CHECKS])
def test_bench_runs_at_its_smallest_size(name, tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTALIGN_BENCH_RESULTS", str(tmp_path))
    module = importlib.import_module(name)
    if name == "code_reward" and not has_commit("2f3296c"):
        pytest.skip("the reference sandbox's commit is not in this clone's history (a shallow clone)")
    returned = module.main(list(module.SMOKE))

    recorded = json.loads((tmp_path / f"{name}.json").read_text())
    assert recorded["script"] == f"bench/{name}.py"
    (variant, result), = recorded["variants"].items()
    common = importlib.import_module("common")
    expected = {"quickstart": "recipe=tiny_recipe", "recipe_seeds": "tiny_recipe --seeds 0"}
    assert variant == expected.get(name, common.variant_name(module.SMOKE))
    assert {"cpu", "cores", "threads", "torch", "transformers"} <= set(result["machine"])
    assert result["date"].endswith("UTC")
    assert json.loads(json.dumps(returned)) == {k: v for k, v in result.items() if k not in ("machine", "commit", "date")}
    assert CHECKS[name](result), result


def test_a_second_variant_keeps_the_first(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTALIGN_BENCH_RESULTS", str(tmp_path))
    common = importlib.import_module("common")
    common.write_result("example", {"figure": 1}, "defaults")
    common.write_result("example", {"figure": 2}, common.variant_name(["max_steps=3"]))
    variants = json.loads((tmp_path / "example.json").read_text())["variants"]
    assert {k: v["figure"] for k, v in variants.items()} == {"defaults": 1, "max_steps=3": 2}
    assert not list(tmp_path.glob("*.tmp"))
