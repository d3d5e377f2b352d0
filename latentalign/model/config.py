"""Our DeepSeek-V2 config: transformers' `DeepseekV2Config` plus what training needs.

transformers owns the `deepseek_v2` model type, so ours registers as `latentalign_deepseek_v2`. Every field of
the parent keeps its meaning; the additions are the paper's balance-loss coefficients (DeepSeek-V2 §2.2.3),
the device-group count those losses use, the coefficient TRL reads (`router_aux_loss_coef`), a training-only
token-dropping capacity factor, and the choice of MLA attention path.

Presets carry the hub values of DeepSeek-V2 and V2-Lite (see the design facts §7), and `tiny`, the embedded
default that trains on two CPU cores.
"""

from __future__ import annotations

import math

from types import MappingProxyType

from huggingface_hub.dataclasses import strict
from transformers import DeepseekV2Config

MODEL_TYPE = "latentalign_deepseek_v2"
MLA_PATHS = ("auto", "expanded", "absorbed")
SCORE_POOLING = ("last", "mean", "likelihood", "last_non_pad")
SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")

# The YaRN settings shipped with DeepSeek-V2, V2-Chat and V2-Lite (4K -> 160K, §4 of the facts).
DEEPSEEK_V2_YARN = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}


@strict
class LatentAlignConfig(DeepseekV2Config):
    r"""
    aux_loss_alpha (`float`, defaults to 0.001):
        alpha1, the expert-level balance loss coefficient. Same name and meaning as in the hub configs.
    device_aux_loss_alpha (`float`, defaults to 0.0):
        alpha2, the device-level balance loss coefficient (0.05 for DeepSeek-V2).
    comm_aux_loss_alpha (`float`, defaults to 0.0):
        alpha3, the communication balance loss coefficient (0.02 for DeepSeek-V2).
    num_device_groups (`int`, *optional*):
        D, the number of devices the routed experts are spread over, used by the device and communication
        losses. Defaults to `n_group` (the groups of device-limited routing), else 1.
    router_aux_loss_coef (`float`, defaults to 1.0):
        The weight TRL puts on `outputs.aux_loss`. The alphas already scale each balance term, so 1.0 adds them
        as the paper does; 0.0 turns the balance loss off.
    moe_capacity_factor (`float`, *optional*):
        Token dropping while training: each device group keeps at most `factor * tokens * top_k / D`
        assignments, dropping those of lowest affinity. `None` (the default) drops nothing; never applied in eval.
    mla_attention (`str`, defaults to `"auto"`):
        `"expanded"` up-projects the latent into per-head keys and values (training, prefill); `"absorbed"`
        folds W^UK into the query and W^UV after attention, attending over the cached latents (decoding);
        `"auto"` uses absorbed attention when a cache already holds past tokens, expanded otherwise.
    seq_aux (`bool`, defaults to `True`):
        The hub key: balance losses per sequence, averaged over the batch (true, as the hub configs ship), or
        over all the batch's tokens at once (false), as the original code does.
    moe_layer_freq (`int`, defaults to 1):
        The hub key: layer i is MoE when i >= first_k_dense_replace and i % moe_layer_freq == 0, dense otherwise.
    scoring_func (`str`, defaults to `"softmax"`):
        The hub key: affinities by softmax (DeepSeek-V2) or by sigmoid (DeepSeek-V3, Moonlight, Kimi-K2; with
        `topk_method: noaux_tc`). A sigmoid model's gate weights are its chosen experts' sigmoid scores,
        renormalised with `norm_topk_prob` and then scaled by `routed_scaling_factor`.
    topk_method (`str`, defaults to `"greedy"`):
        The hub key: `"greedy"` (top-K), `"group_limited_greedy"` (DeepSeek-V2's device-limited routing: groups
        ranked by their best affinity), or `"noaux_tc"` (DeepSeek-V3: top-K of `scores + e_score_correction_bias`,
        groups ranked by the sum of their two best biased scores; the bias only chooses, the weights are the
        unbiased scores). The bias is a buffer of each router, moved by the training stages'
        `bias_update_speed` (auxiliary-loss-free balancing), never by gradients.
    rope_interleave (`bool`, defaults to `True`):
        The `deepseek_v3` key: rotary dimensions in interleaved pairs, as every DeepSeek checkpoint has them
        (and as DeepSeek-V2's rotary computes); `false` is refused.
    num_nextn_predict_layers (`int`, defaults to 0):
        The hub key: DeepSeek-V3's multi-token-prediction modules, stored after the last decoder layer.
        Post-training drops them: loading skips their weights (and says so); exports declare 0.
    ep_size (`int`, defaults to 1):
        The hub key: experts per rank in the original inference code; it does not change what is computed.
    score_pooling (`str`, defaults to `"last"`):
        How the reward head (`LatentAlignForSequenceClassification`) turns per-token scores into one: `"last"`
        reads the last real token (of the attention mask); `"mean"` averages over all real tokens, so a
        single wrong token scores where it stands instead of having to be carried to the end; `"likelihood"`
        adds to the last token's score the sequence's log-likelihood under the model's own language-model head
        (kept from the checkpoint), times a learned scale that starts at 1: a model that predicts correct
        replies well ranks a pair before any reward training, and Bradley-Terry then tunes both parts;
        `"last_non_pad"` is transformers' own rule, the rightmost token that is not the pad token whatever the
        attention mask (with pad = EOS, the token before a trailing EOS): a transformers-native
        `*ForSequenceClassification` checkpoint loads with it, so that it scores as it was trained.
    """

    model_type = MODEL_TYPE
    auto_map = MappingProxyType({})  # no remote code; tools that read it (TRL, the Auto classes) find it empty

    num_experts_per_tok: int | None = 6  # transformers leaves it unset; every DeepSeek-V2 model routes to 6
    n_shared_experts: int | None = 2  # transformers types it int; DeepSeek's original code reads null as none
    aux_loss_alpha: float = 0.001
    device_aux_loss_alpha: float = 0.0
    comm_aux_loss_alpha: float = 0.0
    num_device_groups: int | None = None
    router_aux_loss_coef: float = 1.0
    moe_capacity_factor: float | None = None
    mla_attention: str = "auto"
    score_pooling: str = "last"
    seq_aux: bool = True
    moe_layer_freq: int = 1
    scoring_func: str = "softmax"
    ep_size: int = 1
    rope_interleave: bool = True
    num_nextn_predict_layers: int = 0

    def __post_init__(self, **kwargs):
        # A native checkpoint's config says `deepseek_v2`; kept on the instance, transformers would treat this class
        # as custom code of that type and skip the per-expert -> fused weight conversion (random experts).
        kwargs.pop("model_type", None)
        super().__post_init__(**kwargs)

    def _validate_sizes(self):
        """Widths and counts above 0 (a 0 builds layers of no width that train without complaint), and the
        scales finite."""
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        for key in sizes + ("q_lora_rank",):
            value = getattr(self, key, None)
            if not (value is None and key == "q_lora_rank") and not (isinstance(value, int) and value > 0):
                raise ValueError(f"{key}={value!r} is not supported; it must be a positive integer"
                                 + (" or None" if key == "q_lora_rank" else "") + ".")
        rope = getattr(self, "rope_parameters", None)
        kind = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
        if kind != "default":
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            if kind not in ROPE_INIT_FUNCTIONS:
                raise ValueError(f"rope_scaling type {kind!r} is not supported; it must be one of "
                                 f"{sorted(ROPE_INIT_FUNCTIONS)} (or none).")
        for key in ("routed_scaling_factor", "rms_norm_eps", "rope_theta"):
            value = getattr(self, key, None)
            if value is None and key == "rope_theta" and isinstance(rope, dict):  # transformers 5 keeps it there
                value = rope.get("rope_theta")
            if isinstance(value, (int, float)) and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{key}={value!r} is not supported; it must be a finite number > 0.")

    def validate_architecture(self):
        self._validate_sizes()
        super().validate_architecture()
        for key, ok, need in (
            ("scoring_func", self.scoring_func in SCORING_FUNCS, f"one of {SCORING_FUNCS}"),
            ("rope_interleave", self.rope_interleave is True,
             "true: DeepSeek checkpoints lay rotary dimensions out in interleaved pairs"),
            ("n_routed_experts", isinstance(self.n_routed_experts, int) and self.n_routed_experts > 0,
             "a positive number of routed experts"),
            ("num_key_value_heads", self.num_key_value_heads in (None, self.num_attention_heads),
             f"num_attention_heads ({self.num_attention_heads}): MLA has one key and value per head"),
            ("moe_layer_freq", isinstance(self.moe_layer_freq, int) and self.moe_layer_freq >= 1, "an integer >= 1"),
            ("ep_size", isinstance(self.ep_size, int) and self.ep_size >= 1, "an integer >= 1"),
            ("n_shared_experts", self.n_shared_experts is None or self.n_shared_experts >= 0, "None or >= 0"),
        ):
            if not ok:
                raise ValueError(f"{key}={getattr(self, key)!r} is not supported; it must be {need}.")
        if self.mla_attention not in MLA_PATHS:
            raise ValueError(f"mla_attention must be one of {MLA_PATHS}, got {self.mla_attention!r}.")
        if self.score_pooling not in SCORE_POOLING:
            raise ValueError(f"score_pooling must be one of {SCORE_POOLING}, got {self.score_pooling!r}.")
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method={self.topk_method!r} is not supported; it must be one of {TOPK_METHODS}.")
        if (self.scoring_func == "sigmoid") != (self.topk_method == "noaux_tc"):
            raise ValueError(
                f"scoring_func={self.scoring_func!r} with topk_method={self.topk_method!r} is not supported: "
                f"DeepSeek-V3-style routing is scoring_func 'sigmoid' with topk_method 'noaux_tc', DeepSeek-V2's "
                f"is 'softmax' with 'greedy' or 'group_limited_greedy'."
            )
        n_experts, top_k = self.n_routed_experts, self.num_experts_per_tok
        if top_k is None or not 0 < top_k <= n_experts:
            raise ValueError(f"num_experts_per_tok must be in 1..n_routed_experts ({n_experts}), got {top_k}.")
        if self.topk_method in ("group_limited_greedy", "noaux_tc"):
            if not self.n_group or n_experts % self.n_group:
                raise ValueError(
                    f"{self.topk_method} routing needs n_group dividing n_routed_experts ({n_experts}), "
                    f"got n_group={self.n_group}."
                )
            if self.topk_method == "noaux_tc" and self.n_group > 1 and n_experts // self.n_group < 2:
                raise ValueError(f"noaux_tc ranks groups by their two best experts; n_group={self.n_group} leaves "
                                 f"{n_experts // self.n_group} per group.")
            if not self.topk_group or not 0 < self.topk_group <= self.n_group:
                raise ValueError(f"topk_group must be in 1..n_group ({self.n_group}), got {self.topk_group}.")
        if n_experts % self.device_groups:
            raise ValueError(
                f"num_device_groups ({self.device_groups}) must divide n_routed_experts ({n_experts})."
            )
        for name in ("aux_loss_alpha", "device_aux_loss_alpha", "comm_aux_loss_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        if not isinstance(self.num_nextn_predict_layers, int) or self.num_nextn_predict_layers < 0:
            raise ValueError(f"num_nextn_predict_layers must be an integer >= 0, got {self.num_nextn_predict_layers!r}.")
        if self.moe_capacity_factor is not None and self.moe_capacity_factor <= 0:
            raise ValueError(f"moe_capacity_factor must be > 0 or None, got {self.moe_capacity_factor}.")

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer `layer_idx` holds DeepSeekMoE (else a dense MLP), as the original code decides."""
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @property
    def family(self) -> str:
        """"deepseek_v3" for sigmoid routing with a score-correction bias (V3, R1, Moonlight, Kimi-K2), else
        "deepseek_v2"."""
        return "deepseek_v3" if self.scoring_func == "sigmoid" else "deepseek_v2"

    @property
    def device_groups(self) -> int:
        """D of the device and communication balance losses."""
        return self.num_device_groups or self.n_group or 1

    @property
    def device_topk(self) -> int:
        """M: how many device groups one token may reach (DeepSeek-V2 routes to at most 3 of 8)."""
        if self.topk_method in ("group_limited_greedy", "noaux_tc") and self.topk_group:
            return self.topk_group
        return min(self.device_groups, self.num_experts_per_tok)


def _tiny() -> dict:
    # About 2M parameters: trains on 2 CPU cores in minutes. The vocabulary is replaced by the size of the
    # embedded tokenizer when a stage builds the model.
    return dict(
        vocab_size=512,
        hidden_size=192,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        max_position_embeddings=512,
        rope_theta=10000.0,
        aux_loss_alpha=0.01,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def _hub_common() -> dict:
    return dict(
        vocab_size=102400,
        num_attention_heads=None,  # set below
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_shared_experts=2,
        num_experts_per_tok=6,
        first_k_dense_replace=1,
        max_position_embeddings=163840,
        rope_theta=10000.0,
        rope_scaling=dict(DEEPSEEK_V2_YARN),
        rms_norm_eps=1e-6,
        bos_token_id=100000,
        eos_token_id=100001,
        tie_word_embeddings=False,
        norm_topk_prob=False,
    )


def _deepseek_v2_lite() -> dict:
    cfg = _hub_common()
    cfg.update(
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=27,
        num_attention_heads=16,
        num_key_value_heads=16,
        q_lora_rank=None,
        n_routed_experts=64,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
        aux_loss_alpha=0.001,  # alpha1 only: all of Lite's experts sit on one device
    )
    return cfg


def _deepseek_v2() -> dict:
    cfg = _hub_common()
    cfg.update(
        hidden_size=5120,
        intermediate_size=12288,
        moe_intermediate_size=1536,
        num_hidden_layers=60,
        num_attention_heads=128,
        num_key_value_heads=128,
        q_lora_rank=1536,
        n_routed_experts=160,
        topk_method="group_limited_greedy",
        n_group=8,
        topk_group=3,
        routed_scaling_factor=16.0,
        aux_loss_alpha=0.003,
        device_aux_loss_alpha=0.05,
        comm_aux_loss_alpha=0.02,
    )
    return cfg


def _v3_routing() -> dict:
    # DeepSeek-V3's MoE (technical report §2.1.2): sigmoid affinities, bias-corrected top-K, renormalised
    # weights scaled by routed_scaling_factor, and only the small sequence-wise balance loss (alpha 0.0001).
    return dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, aux_loss_alpha=0.0001,
                seq_aux=True, rope_interleave=True)


def _tiny_v3() -> dict:
    # `tiny` with DeepSeek-V3's routing, in 2 groups of 4 experts (one kept per token): every V3 code path runs.
    cfg = _tiny()
    cfg.update(_v3_routing(), n_group=2, topk_group=1, routed_scaling_factor=2.5)
    return cfg


def _moonlight() -> dict:
    # moonshotai/Moonlight-16B-A3B's config.json: DeepSeek-V3's architecture at V2-Lite's size.
    cfg = _deepseek_v2_lite()
    cfg.update(
        _v3_routing(),
        vocab_size=163840,
        intermediate_size=11264,
        routed_scaling_factor=2.446,
        aux_loss_alpha=0.001,
        max_position_embeddings=8192,
        rope_theta=50000.0,
        rope_scaling=None,
        rms_norm_eps=1e-5,
        bos_token_id=163584,
        eos_token_id=163586,
    )
    return cfg


def _deepseek_v3() -> dict:
    # deepseek-ai/DeepSeek-V3's config.json (also R1's), without its MTP module and FP8 quantisation.
    cfg = _hub_common()
    cfg.update(
        _v3_routing(),
        vocab_size=129280,
        hidden_size=7168,
        intermediate_size=18432,
        moe_intermediate_size=2048,
        num_hidden_layers=61,
        num_attention_heads=128,
        num_key_value_heads=128,
        q_lora_rank=1536,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        first_k_dense_replace=3,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        rope_scaling=dict(DEEPSEEK_V2_YARN, mscale=1.0, mscale_all_dim=1.0),
        bos_token_id=0,
        eos_token_id=1,
    )
    return cfg


PRESETS = {"tiny": _tiny, "deepseek-v2-lite": _deepseek_v2_lite, "deepseek-v2": _deepseek_v2, "tiny-v3": _tiny_v3,
           "moonlight": _moonlight, "deepseek-v3": _deepseek_v3}


def model_config(name: str = "tiny", **overrides) -> LatentAlignConfig:
    """Build a config from a preset, e.g. `model_config("tiny", num_hidden_layers=2)`.

    >>> model_config("deepseek-v2-lite").n_routed_experts
    64
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; choose one of {sorted(PRESETS)}.")
    values = PRESETS[name]()
    known = set(values) | set(LatentAlignConfig.__dataclass_fields__) | {"rope_scaling", "rope_theta", "num_labels",
                                                                       "experts_implementation", "attn_implementation"}
    unknown = sorted(k for k in overrides if k not in known and not hasattr(LatentAlignConfig, k))
    if unknown:
        raise ValueError(f"Unknown config keys for preset {name!r}: {unknown}.")
    values.update(overrides)
    return build_config(**values)


def build_config(**values) -> LatentAlignConfig:
    """`LatentAlignConfig(**values)`, with a rejected value raised as a plain ValueError of one line (the strict
    dataclass wraps it in a class-validation error)."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        return LatentAlignConfig(**values)
    except StrictDataclassError as err:
        cause = err.__cause__ if err.__cause__ is not None else err
        raise ValueError(str(cause)) from None
