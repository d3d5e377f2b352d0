"""`import latentalign` registers our model with transformers' Auto classes, whichever is imported first."""

import subprocess
import sys

import pytest

CHECK = ("from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification; "
         "c = AutoConfig.for_model('latentalign_deepseek_v2', num_hidden_layers=1, hidden_size=32, "
         "num_attention_heads=2, n_routed_experts=4, num_experts_per_tok=2, vocab_size=50); "
         "names = [type(a.from_config(c)).__name__ for a in (AutoModel, AutoModelForCausalLM, "
         "AutoModelForSequenceClassification)]; "
         "assert names == ['LatentAlignModel', 'LatentAlignForCausalLM', 'LatentAlignForSequenceClassification'], names")


@pytest.mark.parametrize("first", ["import latentalign; import transformers", "import transformers; import latentalign"])
def test_import_registers_auto_classes(first):
    subprocess.run([sys.executable, "-c", f"{first}; {CHECK}"], check=True, timeout=120)


def test_import_alone_does_not_load_torch():
    code = "import sys, latentalign; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
