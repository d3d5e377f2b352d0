"""Stage defaults meet the user's TRL options: a scheduler's own options go with that scheduler."""

from trl import SFTConfig

from latentalign.sft import load_config
from latentalign.sft.stage import TRL_DEFAULTS
from latentalign.stage import trl_config


def args_for(tmp_path, *overrides):
    cfg = load_config(None, [f"output_dir={tmp_path}", *overrides])
    return trl_config(SFTConfig, {**TRL_DEFAULTS, "output_dir": str(tmp_path)}, cfg)


def test_default_scheduler_keeps_its_options_even_when_named_again(tmp_path):
    for extra in ((), ("lr_scheduler_type=cosine_with_min_lr",)):
        args = args_for(tmp_path, *extra)
        assert args.lr_scheduler_type == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}


def test_another_scheduler_drops_the_defaults_options_and_keeps_the_users(tmp_path):
    assert not args_for(tmp_path, "lr_scheduler_type=constant").lr_scheduler_kwargs  # TRL's own default
    args = args_for(tmp_path, "lr_scheduler_type=cosine_with_min_lr", 'lr_scheduler_kwargs={"min_lr": 0.0001}')
    assert args.lr_scheduler_kwargs == {"min_lr": 0.0001}
