"""transformers' own common model tests (`ModelTesterMixin` of the installed transformers) on our three classes,
for three configs: DeepSeek-V2-Lite-like (no query compression, greedy routing), DeepSeek-V2-like (query
compression, device-limited routing) and DeepSeek-V3-like (sigmoid routing with its bias). `make test-transformers`
fetches the tests from the package index (`hf_common_fetch.py`); without them this module is skipped.

Our tester is the part transformers keeps per model. It registers our classes in transformers' static name
tables (what adding a model to transformers does), so the mixin gives the causal LM and the reward head labels
and leaves the base model out of the training tests. What it skips, it says why.
"""

import sys
import unittest

import pytest
import torch

from hf_common_fetch import fetched, folder

pytestmark = pytest.mark.transformers_common
if not fetched():
    pytest.skip("transformers' common tests are not fetched: run `make test-transformers`", allow_module_level=True)
pytest.importorskip("parameterized")
sys.path.insert(0, str(folder()))

from hf_common.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask  # noqa: E402
from transformers.models.auto import modeling_auto  # noqa: E402

import latentalign  # noqa: E402
from latentalign.model import (  # noqa: E402
    MODEL_TYPE,
    LatentAlignForCausalLM,
    LatentAlignForSequenceClassification,
    LatentAlignModel,
)

for table, cls in ((modeling_auto.MODEL_MAPPING_NAMES, LatentAlignModel),
                   (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, LatentAlignForCausalLM),
                   (modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
                    LatentAlignForSequenceClassification)):
    table.setdefault(MODEL_TYPE, cls.__name__)

V2_LITE = dict(q_lora_rank=None, topk_method="greedy")
V2 = dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=16.0)
V3 = dict(q_lora_rank=24, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
          routed_scaling_factor=2.5, n_group=2, topk_group=1)


class Tester:
    def __init__(self, parent, family: dict, batch_size: int = 2, seq_length: int = 7):
        self.parent, self.family, self.batch_size, self.seq_length = parent, family, batch_size, seq_length
        self.is_training, self.vocab_size, self.hidden_size = True, 99, 32
        self.num_hidden_layers, self.num_attention_heads = 2, 4

    def get_config(self):
        return latentalign.model_config(
            "tiny", vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=37,
            moe_intermediate_size=12, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_attention_heads,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
            num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=1, **self.family)

    def prepare_config_and_inputs_for_common(self):
        ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        return self.get_config(), {"input_ids": ids, "attention_mask": random_attention_mask(ids.shape)}


def _skip(reason: str):
    def skipped(self, *args, **kwargs):
        self.skipTest(reason)

    return skipped


GROUPED = [name for name in dir(ModelTesterMixin) if name.startswith("test_eager_matches_batched_and_grouped")]


class LatentAlignCommonTests(ModelTesterMixin):
    all_model_classes = (LatentAlignModel, LatentAlignForCausalLM, LatentAlignForSequenceClassification)
    family: dict = V2_LITE

    def setUp(self):
        self.model_tester = Tester(self, self.family)

    test_generation_tester_mixin_inheritance = _skip(
        "GenerationTesterMixin is in transformers' repository, not its sdist; our generate() is compared with "
        "transformers' in tests/unit/model/test_generation.py")
    test_model_rope_scaling_frequencies = _skip(
        "transformers' DeepseekV2RotaryEmbedding, which ours is, returns complex frequencies, not (cos, sin)")
    test_tp_plan_matches_params = _skip(
        "transformers' DeepseekV2 TP plan names q_proj and q_b_proj, of which a config has one")
    locals().update(dict.fromkeys(GROUPED, _skip(
        "it watches transformers' grouped_mm/batched_mm functions, which our GroupedExperts implements itself; "
        "test_our_experts_implementations_agree compares the three")))

    def test_our_experts_implementations_agree(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        torch.manual_seed(0)
        model = LatentAlignForCausalLM(config).eval()
        outputs = {}
        for impl in ("eager", "batched_mm", "grouped_mm"):
            model.set_experts_implementation(impl)
            with torch.no_grad():
                outputs[impl] = model(**inputs).logits
        for impl in ("batched_mm", "grouped_mm"):
            torch.testing.assert_close(outputs[impl], outputs["eager"], atol=1e-5, rtol=1e-5)

    def test_bc_cache_name_forward(self):
        """Ours takes `past_key_values` as another name for `cache` without a warning (transformers 5.19, which
        vLLM's builds pin, has no `cache`); it must mean the same."""
        from transformers.cache_utils import DynamicCache

        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = LatentAlignForCausalLM(config).eval()
        with torch.no_grad():
            old = model(**inputs, past_key_values=DynamicCache(config=config), use_cache=True).logits
            new = model(**inputs, cache=DynamicCache(config=config), use_cache=True).logits
        torch.testing.assert_close(old, new)


class TestLite(LatentAlignCommonTests, unittest.TestCase):
    family = V2_LITE
    test_keep_in_fp32_modules_exist = _skip("e_score_correction_bias is DeepSeek-V3 routing's; TestV3 checks it")


class TestV2(LatentAlignCommonTests, unittest.TestCase):
    family = V2
    test_keep_in_fp32_modules_exist = _skip("e_score_correction_bias is DeepSeek-V3 routing's; TestV3 checks it")


class TestV3(LatentAlignCommonTests, unittest.TestCase):
    family = V3
