"""Loading and exporting checkpoints of both families (DeepSeek-V2, and DeepSeek-V3 / R1 / Moonlight / Kimi-K2).

- ours: `model_type: latentalign_deepseek_v2`, written by `save_pretrained` of our models (either family);
- transformers-native: `model_type: deepseek_v2` or `deepseek_v3`, fused 3-D expert weights or per-expert names
  (Kimi-K2's `kimi_k2`, whose config.json names `DeepseekV3ForCausalLM`, reads as `deepseek_v3`);
- the original hub format: the same model types with `auto_map`, `rope_scaling`, per-expert weight names
  (`mlp.experts.E.{gate,up,down}_proj.weight`); V3's also carries `mlp.gate.e_score_correction_bias` and its
  multi-token-prediction layers after the last decoder layer (skipped on load, with a logged note). FP8
  checkpoints (`quantization_config`, `weight_scale_inv` tensors) are refused with the way to dequantise them.

All load through transformers' own conversion (per-expert names are merged into the fused experts),
registered for our model type. `export_native` writes the format vanilla transformers and vLLM read
(`deepseek_v2` or `deepseek_v3` by the config's family), with the original per-expert names and
`rope_scaling`/`rope_theta` restored for tools that read the hub format.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from dataclasses import MISSING
from pathlib import Path

import torch

from .config import MODEL_TYPE, LatentAlignConfig, build_config
from .modeling import LatentAlignForCausalLM, LatentAlignForSequenceClassification

log = logging.getLogger(__name__)

NATIVE_MODEL_TYPE = "deepseek_v2"
NATIVE_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
NATIVE_ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
V3_LIKE = {"kimi_k2": "DeepseekV3ForCausalLM"}  # model_type -> the architecture its config.json names
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# Keys of a saved config that describe the file rather than the architecture.
_FILE_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path")
# Hub keys transformers' DeepseekV2Config does not declare but keeps (the original code reads them).
HUB_KEYS = ("aux_loss_alpha", "seq_aux", "moe_layer_freq", "scoring_func", "ep_size")
# What a `deepseek_v3` config.json means when it leaves a key out: transformers' DeepseekV3Config defaults, and
# the routing its code always computes (it declares neither `scoring_func` nor `topk_method`).
V3_IMPLIED = {"scoring_func": "sigmoid", "topk_method": "noaux_tc"}


def our_keys() -> tuple[str, ...]:
    """Config keys only latentalign knows: ours, not transformers' and not the hub's (kept out of exports)."""
    from transformers import DeepseekV2Config

    return tuple(sorted(set(LatentAlignConfig.__dataclass_fields__) - set(DeepseekV2Config.__dataclass_fields__)
                        - set(HUB_KEYS)))


def _exportable(config: LatentAlignConfig) -> None:
    """Refuse what vanilla transformers' deepseek_v2 / deepseek_v3 would compute differently (it ignores these
    keys, or, for V3 with one expert per token, renormalises where the original code does not)."""
    single = config.num_experts_per_tok == 1
    norm_ok = (not config.norm_topk_prob or single) if config.family == "deepseek_v2" else not (config.norm_topk_prob and single)
    for key, value, ok in (("norm_topk_prob", config.norm_topk_prob, norm_ok),
                           ("moe_layer_freq", config.moe_layer_freq, config.moe_layer_freq == 1),
                           ("n_shared_experts", config.n_shared_experts, bool(config.n_shared_experts))):
        if not ok:
            raise CheckpointError(f"cannot export {key}={value!r} to transformers' {config.family}, which would "
                                  f"compute another model; keep the model in latentalign's format.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the path and what is wrong."""


def local_checkpoint_dir(path) -> Path | None:
    """The checkpoint directory `path` names, None for a hub id; a CheckpointError for anything else."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a checkpoint directory holding config.json and weights.")
    # Not on disk: a hub repo id ("org/name") is resolved by transformers, anything path-like is an error.
    from ..hub_id import is_hub_id

    if not is_hub_id(path):
        raise CheckpointError(f"{path}: no such checkpoint directory.")
    return None


def not_a_model_dir(local: Path) -> str:
    """Why a folder without config.json is not a model: a LoRA checkpoint of a stage is met most often."""
    if (local / "adapter_config.json").is_file():
        return (f"{local}: a LoRA adapter checkpoint (adapter_config.json, no config.json), not a model: a LoRA stage "
                f"writes the merged model to its model/ folder ({local.parent / 'model'}) when it ends; rerun the "
                f"stage into the same output_dir to resume from its last checkpoint and get it.")
    return f"{local}: missing config.json; this is not a saved model directory."


def read_config(path, **overrides) -> LatentAlignConfig:
    """Our config from any of the three formats (a directory or a hub id)."""
    local = local_checkpoint_dir(path)
    if local is None:
        from huggingface_hub import hf_hub_download

        try:
            config_file = Path(hf_hub_download(str(path), "config.json"))
        except Exception as err:  # noqa: BLE001 -- the hub's errors are many: offline, not found, gated, a bad id
            raise CheckpointError(f"{path}: no such model directory here, and not a model the hub gives "
                                  f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}).") from None
    else:
        config_file = local / "config.json"
        if not config_file.is_file():
            raise CheckpointError(not_a_model_dir(local))
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err}).") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object of config fields, got a {type(raw).__name__}.")
    model_type = raw.get("model_type")
    if model_type in V3_LIKE and V3_LIKE[model_type] in (raw.get("architectures") or [V3_LIKE[model_type]]):
        model_type = "deepseek_v3"  # DeepSeek-V3's architecture under another name: its code, its keys
    if model_type not in (MODEL_TYPE, *NATIVE_MODEL_TYPES):
        raise CheckpointError(
            f"{config_file}: model_type {model_type!r} is not a DeepSeek-V2/V3 architecture; latentalign loads "
            f"{', '.join(repr(t) for t in (*NATIVE_MODEL_TYPES, MODEL_TYPE))} checkpoints."
        )
    quantization = raw.get("quantization_config") or {}
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else quantization
        raise CheckpointError(
            f"{config_file}: a quantised checkpoint (quant_method {method!r}) cannot be post-trained as it is; "
            f"dequantise it to bf16 first (for DeepSeek-V3's FP8 weights, its inference/fp8_cast_bf16.py multiplies "
            f"each weight by its `weight_scale_inv` blocks) and drop `quantization_config` from config.json."
        )
    values = {k: v for k, v in raw.items() if k not in _FILE_KEYS}
    if model_type in NATIVE_MODEL_TYPES and any(str(a).endswith("ForSequenceClassification")
                                                for a in raw.get("architectures") or []):
        values.setdefault("score_pooling", "last_non_pad")  # trained under transformers' rule: scored by it
    if model_type == "deepseek_v3":
        values = _v3_values(values)
    if model_type in NATIVE_MODEL_TYPES and values.get("rope_parameters") and values.get("rope_scaling"):
        values.pop("rope_scaling")  # written by export_native for the original code; rope_parameters rules here
        values.pop("rope_theta", None)
    values.update(overrides)
    try:
        return build_config(**values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_file}: invalid config: {err}") from None


def _v3_values(values: dict) -> dict:
    """A `deepseek_v3` config.json's keys as ours: what it leaves out means what transformers' V3 code computes."""
    from transformers import DeepseekV3Config

    values = dict(values)
    if "num_mtp_layers" in values:  # transformers' name for the hub's num_nextn_predict_layers
        values.setdefault("num_nextn_predict_layers", values.pop("num_mtp_layers"))
    for key, value in V3_IMPLIED.items():
        values.setdefault(key, value)
    fields = getattr(DeepseekV3Config, "__dataclass_fields__", {})
    for key in set(vars(DeepseekV3Config).get("__annotations__", {})) & set(LatentAlignConfig.__dataclass_fields__):
        default = fields[key].default if key in fields else MISSING
        if key not in values and key != "rope_parameters" and default is not MISSING:
            values[key] = default
    return values


def _skipped_mtp_layers(unexpected: list[str], config: LatentAlignConfig) -> list[int]:
    """Indices of decoder layers past the config's last (DeepSeek-V3's multi-token-prediction modules)."""
    found = {i for k in unexpected if (i := _layer_of(k)) is not None}
    return sorted(i for i in found if i >= config.num_hidden_layers)


def _layer_of(key: str) -> int | None:
    """The decoder layer a weight's name places it in, or None outside the layers."""
    match = re.match(r"(?:model\.)?layers\.(\d+)\.", key)
    return int(match.group(1)) if match else None


def _check_unexpected(path, unexpected: list[str], past_last: list[int], config, cls) -> None:
    """Weights the model has no place for are an error, not dropped: layers past the config's last beyond its
    multi-token-prediction modules (num_hidden_layers too small), and anything else, except the LM head a reward
    model with another pooling does not read and old checkpoints' rotary buffers."""
    allowed = range(config.num_hidden_layers, config.num_hidden_layers + (config.num_nextn_predict_layers or 0))
    extra = [i for i in past_last if i not in allowed]
    if extra:
        raise CheckpointError(f"{path}: holds decoder layers {extra} past the config's {config.num_hidden_layers} "
                              f"(and {config.num_nextn_predict_layers or 0} multi-token-prediction ones); is "
                              f"num_hidden_layers in config.json right?")
    reward = cls.__name__.endswith("SequenceClassification")
    stray = [k for k in unexpected if not k.endswith("inv_freq") and not (reward and k == "lm_head.weight")
             and ((layer := _layer_of(k)) is None or layer < config.num_hidden_layers)]  # past the last: above
    if stray:
        raise CheckpointError(f"{path}: holds weights the model has no place for: {sorted(stray)[:5]}"
                              f"{' ...' if len(stray) > 5 else ''}; is it another architecture's checkpoint?")


EXPERT_KEY = re.compile(r"(?:model\.)?layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


def _weight_names(local: Path) -> dict[str, str]:
    """The checkpoint's weight names and the file of each, from its safetensors index or headers (no tensor
    read); {} for other formats."""
    from safetensors import safe_open

    index = local / "model.safetensors.index.json"
    try:
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            return {k: v for k, v in weight_map.items() if isinstance(k, str) and isinstance(v, str)}
        if (local / "model.safetensors").is_file():
            with safe_open(local / "model.safetensors", "pt") as f:
                return dict.fromkeys(f.keys(), "model.safetensors")
    except Exception:  # noqa: BLE001 -- unreadable: from_pretrained's error names it
        pass
    return {}


def _check_expert_names(local: Path, config: LatentAlignConfig) -> None:
    """A checkpoint in the per-expert layout holds experts 0..E-1 of each MoE layer, every one whole: transformers
    stacks whatever numbers it finds, in order, so a gap or a stray number would put experts in other slots."""
    names = _weight_names(local)
    found: dict[int, set] = {}
    for key, file in names.items():
        if not (match := EXPERT_KEY.match(key)):
            continue
        layer, expert, kind = int(match[1]), int(match[2]), match[3]
        if layer >= config.num_hidden_layers:
            continue  # multi-token-prediction layers: skipped on load
        if expert >= config.n_routed_experts:
            raise CheckpointError(f"{local / file}: {key}: expert {expert}, where config.json has "
                                  f"n_routed_experts={config.n_routed_experts} (experts 0-{config.n_routed_experts - 1}).")
        found.setdefault(layer, set()).add((expert, kind))
    for layer, present in sorted(found.items()):
        lost = sorted(set(itertools.product(range(config.n_routed_experts), ("gate", "up", "down"))) - present)
        if lost:
            shown = ", ".join(f"layers.{layer}.mlp.experts.{e}.{kind}_proj.weight" for e, kind in lost[:3])
            raise CheckpointError(f"{local}: weights missing from the checkpoint: {shown}"
                                  f"{f' and {len(lost) - 3} more' if len(lost) > 3 else ''} (layer {layer} holds "
                                  f"{len(present)} of its {3 * config.n_routed_experts} expert weights).")


def _unreadable_file(local: Path) -> str:
    """The first safetensors file of `local` whose header cannot be read, for the error that names it."""
    from safetensors import safe_open

    for file in sorted(local.glob("*.safetensors")):
        try:
            with safe_open(file, "pt") as f:
                f.keys()
        except Exception:  # noqa: BLE001 -- any failure to read it is the answer
            return f" ({file.name} cannot be read)"
    return ""


def _from_pretrained(cls, path, config: LatentAlignConfig, kwargs: dict):
    local = local_checkpoint_dir(path)
    if local is not None and not any((local / f).is_file() for f in WEIGHT_FILES):
        raise CheckpointError(f"{local}: no weights found (looked for {', '.join(WEIGHT_FILES)}).")
    if local is not None and config.n_routed_experts:
        _check_expert_names(local, config)
    # Mismatches are collected rather than raised, so that the error below names them in one line.
    kwargs.setdefault("ignore_mismatched_sizes", True)
    try:
        model, info = cls.from_pretrained(str(path), config=config, output_loading_info=True, **kwargs)
    except Exception as err:  # noqa: BLE001 -- narrowed below to a local directory's unreadable weight files
        if local is None or not _unreadable_weights(err):
            raise
        raise CheckpointError(f"{local}: its weight files cannot be read{_unreadable_file(local)} "
                              f"({type(err).__name__}: {str(err)[:200]}); a copy or download cut short? Copy the "
                              f"checkpoint again.") from None
    unexpected = list(info.get("unexpected_keys") or [])
    if any(k.endswith("weight_scale_inv") for k in unexpected):
        raise CheckpointError(f"{path}: holds FP8 block scales (`weight_scale_inv`) but its config.json declares no "
                              f"quantisation; dequantise the weights to bf16 before loading.")
    mtp = _skipped_mtp_layers(unexpected, config)
    _check_unexpected(path, unexpected, mtp, config, cls)
    if mtp:
        log.info("%s: skipped layers %s, the multi-token-prediction modules (num_nextn_predict_layers=%s); "
                 "post-training uses the %d decoder layers only.", path, mtp, config.num_nextn_predict_layers,
                 config.num_hidden_layers)
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        shown = "; ".join(f"{name}: checkpoint {tuple(a)} vs config {tuple(b)}" for name, a, b in list(mismatched)[:3])
        raise CheckpointError(f"{path}: weight shapes do not match config.json ({shown}).")
    # A reward head is new to a causal checkpoint: its score (and the likelihood weight) start fresh.
    reward = cls is LatentAlignForSequenceClassification
    fresh = ("score.", "likelihood_scale.") if reward else ()
    missing = [k for k in info.get("missing_keys") or [] if not k.startswith(fresh)]
    if reward and "lm_head.weight" in missing:
        raise CheckpointError(f"{path}: score_pooling='likelihood' reads the checkpoint's language-model head, and "
                              f"this checkpoint has none (a reward model saved with another pooling?); start from "
                              f"a causal LM or set score_pooling: last.")
    if missing:
        raise CheckpointError(f"{path}: weights missing from the checkpoint: {sorted(missing)[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}.")
    broken = _non_finite(model)
    if broken:
        raise CheckpointError(f"{path}: weights hold NaN or infinite values: {broken[:3]}"
                              f"{f' and {len(broken) - 3} more' if len(broken) > 3 else ''}; every loss and reward "
                              f"from them would be NaN. Was it saved after a diverged step? Load an earlier one.")
    return model


def _non_finite(model: torch.nn.Module) -> list[str]:
    """Names of the parameters holding a NaN or an infinity (those on the meta device, not loaded, are skipped)."""
    return [name for name, p in model.named_parameters()
            if p.is_floating_point() and p.device.type != "meta" and not torch.isfinite(p).all()]


def _unreadable_weights(err: Exception) -> bool:
    """Whether loading failed on the weight files themselves: a truncated or corrupt safetensors or torch file, a
    shard the index names that is not there, an index that is not JSON."""
    from safetensors import SafetensorError

    if isinstance(err, (SafetensorError, FileNotFoundError, json.JSONDecodeError, EOFError)):
        return True
    return isinstance(err, RuntimeError) and "PytorchStreamReader" in str(err)


def load_model(path, *, dtype: torch.dtype | str | None = None, **kwargs) -> LatentAlignForCausalLM:
    """Our causal LM from our checkpoints, transformers-native `deepseek_v2` ones, or original hub ones.

    Config overrides go in as keywords that name config fields (e.g. `mla_attention="absorbed"`); the rest
    go to `from_pretrained` (e.g. `device_map`).
    """
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in LatentAlignConfig.__dataclass_fields__}
    config = read_config(path, **overrides)
    local = local_checkpoint_dir(path)
    saved = json.loads((local / "config.json").read_text()) if local and (local / "config.json").is_file() else {}
    heads = [a for a in saved.get("architectures") or [] if str(a).endswith("ForSequenceClassification")]
    if heads:  # its LM head was never saved: "weights missing: lm_head.weight" would not say why
        raise CheckpointError(f"{path}: a reward model ({heads[0]}: one score per sequence, no language-model "
                              f"head); this needs a chat model, such as an SFT stage's model directory.")
    if dtype is not None:
        kwargs["dtype"] = dtype
    return _from_pretrained(LatentAlignForCausalLM, path, config, kwargs)


def load_reward_model(path, *, dtype=None, num_labels: int = 1, **kwargs) -> LatentAlignForSequenceClassification:
    """A reward model (one scalar per sequence) from any checkpoint `load_model` reads.

    From a causal-LM checkpoint the backbone is loaded and the score head starts from the config's init.
    """
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in LatentAlignConfig.__dataclass_fields__}
    config = read_config(path, num_labels=num_labels, **overrides)
    if config.pad_token_id is None:
        config.pad_token_id = config.eos_token_id if isinstance(config.eos_token_id, int) else None
    if dtype is not None:
        kwargs["dtype"] = dtype
    return _from_pretrained(LatentAlignForSequenceClassification, path, config, kwargs)


def native_config_dict(config: LatentAlignConfig) -> dict:
    """The config.json of a vanilla `deepseek_v2` or `deepseek_v3` checkpoint (by the config's family):
    transformers' keys plus the hub's rope keys (and, for V3, the routing keys its original code reads)."""
    _exportable(config)
    values = config.to_dict()
    for key in our_keys() + ("num_labels", "id2label", "label2id"):
        values.pop(key, None)
    family = config.family
    values["model_type"] = family
    values["architectures"] = [NATIVE_ARCHITECTURES[family]]
    if family == "deepseek_v3":  # the MTP modules are not exported; the interleaved rotary is V2's and V3's
        values.update(rope_interleave=True, num_nextn_predict_layers=0, topk_method="noaux_tc")
    rope = dict(values.get("rope_parameters") or {})
    values["rope_theta"] = rope.get("rope_theta", 10000.0)
    if rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "rope_type")}
        values["rope_scaling"] = {"type": rope["rope_type"], **scaling}
    return values


def export_native(model, out_dir, *, safe_serialization: bool = True) -> Path:
    """Write a checkpoint that vanilla transformers loads as `deepseek_v2` or `deepseek_v3` (no import of this
    package, no trust_remote_code): original per-expert weight names, LoRA merged, `rope_scaling`/`rope_theta`
    restored, V3's score-correction biases kept."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    if not isinstance(model, LatentAlignForCausalLM):
        raise TypeError(f"export_native expects a LatentAlignForCausalLM (or a PEFT wrapper of one), got "
                        f"{type(model).__name__}.")
    config = native_config_dict(model.config)  # first: a config transformers' classes cannot hold writes nothing
    config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=safe_serialization)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out
