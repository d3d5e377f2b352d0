"""Export a chat model in transformers' own format, check it, and push it to the Hugging Face Hub.

`export_chat_model` writes what a user of vanilla transformers needs: the weights in the native `deepseek_v2`
(or `deepseek_v3`) layout (LoRA merged, `latentalign.export_native`), the tokenizer with its chat template, the generation
config, and a model card (README.md with hub metadata, the eval table, the recipe and the lineage of stages).
`check_export` loads the folder in a fresh Python process that never imports this package, and compares its
logits with ours. `push` uploads the files the export wrote with `huggingface_hub` (create_repo + upload_folder);
the token comes from `HF_TOKEN` or the huggingface_hub login, and is never printed or written.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .hub_id import is_hub_id

log = logging.getLogger(__name__)


class PushError(ValueError):
    """An export or upload problem; the message says what to do."""


_VANILLA_LOGITS = r"""
import sys, torch
from transformers import AutoModelForCausalLM
assert "latentalign" not in sys.modules
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.load(sys.argv[2])
with torch.no_grad():
    logits = model(input_ids=ids).logits
assert "latentalign" not in sys.modules, "the export needed latentalign"
torch.save({"logits": logits, "class": type(model).__name__}, sys.argv[3])
"""


def resolve_model_dir(source) -> tuple[Path, dict | None]:
    """(model directory, run manifest or None): a run folder resolves to its final chat model."""
    source = Path(source)
    manifest_path = source / "manifest.json"
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise PushError(f"{manifest_path}: not a run's manifest ({err}).") from None
        final = manifest.get("final_model") if isinstance(manifest, dict) else None
        if not final:
            raise PushError(f"{source}: the run has no finished chat model yet; run it to the end first.")
        if not isinstance(final, str) or not isinstance(manifest.get("run_dir", ""), str):
            raise PushError(f"{manifest_path}: final_model and run_dir must be paths (strings), got "
                            f"{final!r} and {manifest.get('run_dir')!r}; this run's manifest is damaged.")
        # The runner wrote the path as seen from where it ran ("runs/x/sft/model"): the model is that path's place
        # inside the run folder, wherever the folder is now and wherever push runs (a copy of it included).
        try:
            inside = Path(final).relative_to(manifest.get("run_dir") or "")
        except ValueError:
            raise PushError(f"{source}: the manifest's final model {final} is not inside its run folder "
                            f"{manifest.get('run_dir')}.") from None
        return source / inside, manifest
    if (source / "adapter_config.json").is_file() and not (source / "config.json").is_file():
        from .model.checkpoint import not_a_model_dir

        raise PushError(not_a_model_dir(source))
    if not (source / "config.json").is_file():
        raise PushError(f"{source}: neither a run folder (manifest.json) nor a model directory (config.json).")
    return source, None


def check_export(export_dir, model, *, tolerance: float = 1e-4, timeout_s: float = 600) -> dict:
    """Load `export_dir` with vanilla transformers in a fresh process and compare its logits with `model`'s on
    a fixed batch. Returns {"max_abs_diff", "class"}; raises PushError past `tolerance`."""
    import torch

    model = model.float().eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(ids, f"{tmp}/ids.pt")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        try:
            proc = subprocess.run([sys.executable, "-c", _VANILLA_LOGITS, str(Path(export_dir).resolve()),
                                   f"{tmp}/ids.pt", f"{tmp}/out.pt"], capture_output=True, text=True,
                                  timeout=timeout_s, env=env, cwd=tmp)
        except subprocess.TimeoutExpired:
            raise PushError(f"{export_dir}: vanilla transformers took over {timeout_s:g} s to load the export and "
                            f"run it; the export is complete; skip the check with --no-check (a recipe's push "
                            f"stage: check: false).") from None
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
            raise PushError(f"{export_dir}: vanilla transformers could not load the export: {tail[0]}")
        theirs = torch.load(f"{tmp}/out.pt")
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    diff = (ours - theirs["logits"]).abs().max().item()
    if diff > tolerance:
        raise PushError(f"{export_dir}: logits under vanilla transformers differ from ours by {diff:.3g} "
                        f"(allowed {tolerance}).")
    return {"max_abs_diff": diff, "class": theirs["class"]}


def model_card(repo_id: str, manifest: dict | None, eval_table: str | None, base_model: str | None,
               family: str = "deepseek_v2") -> str:
    version = "V3" if family == "deepseek_v3" else "V2"
    meta = ["---", "library_name: transformers", "pipeline_tag: text-generation",
            f"tags: [{family}, mla, moe, latentalign]"]
    if isinstance(base_model, str) and is_hub_id(base_model) and not Path(base_model).exists():
        meta.append(f"base_model: {base_model}")
    meta.append("---")
    lines = [*meta, "", f"# {repo_id.rsplit('/', 1)[-1]}", "",
             f"A DeepSeek-{version}-style chat model (Multi-head Latent Attention, DeepSeekMoE) post-trained with "
             f"latentalign. It loads in plain transformers as `{family}`:", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
             f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
             'ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}],',
             '                                    add_generation_prompt=True, return_tensors="pt")',
             "print(tokenizer.decode(model.generate(ids, max_new_tokens=32)[0]))", "```", ""]
    if eval_table:
        lines += ["## Evaluation", "", eval_table, ""]
    if manifest:
        lines += ["## Lineage", "", "| stage | type | starts from | steps | minutes | config hash |",
                  "|---|---|---|---|---|---|"]
        stages = manifest.get("stages") if isinstance(manifest.get("stages"), dict) else {}
        for name, stage in stages.items():
            if not isinstance(stage, dict) or stage.get("status") != "done":  # the lineage: the stages that ran
                continue
            steps = (stage.get("metrics") or {}).get("global_step", "-") if stage.get("type") != "eval" else "-"
            minutes = f"{stage['seconds'] / 60:.1f}" if stage.get("seconds") is not None else "-"
            start = stage.get("init") or (stage.get("inputs") or {}).get("model") or "-"
            lines.append(f"| {name} | {stage.get('type')} | {start} | {steps} | {minutes} | "
                         f"`{str(stage.get('hash', ''))[:12]}` |")
        lines += ["", "## Recipe", "", "```yaml", manifest.get("recipe_yaml", "").rstrip(), "```", ""]
    return "\n".join(lines)


def export_chat_model(model_dir, out_dir, *, repo_id: str = "latentalign/model", manifest: dict | None = None,
                      eval_table: str | None = None, check: bool = True) -> dict:
    """Write the native export of `model_dir` to `out_dir` and check it. Returns what was written and checked."""
    from .model import export_native, load_model
    from .training.model_dir import load_tokenizer

    model = load_model(model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    out = Path(out_dir)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} if out.is_dir() else {}
    export_native(model, out)
    tokenizer.save_pretrained(out)
    base = None if (manifest or {}).get("base_model_local") else (manifest or {}).get("base_model")
    (out / "README.md").write_text(model_card(repo_id, manifest, eval_table, base, model.config.family), encoding="utf-8")
    # What this export wrote is what is uploaded: a reused folder (an earlier export, a checkpoint) may hold
    # optimizer states, training arguments or a .env, which stay out.
    written = sorted(p.name for p in out.iterdir() if p.is_file() and before.get(p.name) != p.stat().st_mtime_ns)
    result = {"export_dir": str(out), "files": written, "left_out": sorted(set(before) - set(written))}
    if result["left_out"]:
        log.warning("%s: %s not written by this export, not uploaded", out, ", ".join(result["left_out"]))
    if check:
        result["check"] = check_export(out, model)
    return result


def _token() -> str | None:
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


def upload(export_dir, repo_id: str, files: list[str], *, private: bool = False) -> str:
    """create_repo + upload_folder of `files` (the export's, by name) in `export_dir`; returns the repo URL. Network
    and auth problems become PushError with the token scrubbed from the message."""
    from huggingface_hub import HfApi

    token = _token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run).")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(export_dir), repo_id=repo_id, repo_type="model", allow_patterns=files,
                          commit_message="Upload chat model exported by latentalign")
    except Exception as err:  # noqa: BLE001 -- offline, auth, permissions: the user needs the reason
        message = str(err).replace(token, "***")
        raise PushError(f"upload to {repo_id} failed ({type(err).__name__}: {message.splitlines()[0]}); the "
                        f"export is complete at {export_dir}.") from None
    return str(url)


def push(source, repo_id: str, *, out_dir=None, private: bool = False, dry_run: bool = False,
         eval_table: str | None = None, check: bool = True) -> dict:
    """Export `source` (a run folder or a model directory), check it unless not `check` (the check holds an fp32
    copy of the model in this process and another in transformers', 8 bytes a parameter), and upload it unless
    `dry_run`."""
    if not is_hub_id(repo_id):
        raise PushError(f"repo id {repo_id!r} must look like ORG/NAME.")
    model_dir, manifest = resolve_model_dir(source)
    if eval_table is None and manifest:
        eval_table = manifest.get("eval_table")
    out_dir = Path(out_dir) if out_dir else (Path(source) / "export" if manifest
                                             else Path(f"{model_dir.resolve()}-export"))  # "." -> "<dir>-export"
    _check_out_dir(out_dir, model_dir)
    result = export_chat_model(model_dir, out_dir, repo_id=repo_id, manifest=manifest, eval_table=eval_table,
                               check=check)
    result["repo_id"] = repo_id
    if dry_run:
        result["uploaded"] = False
        return result
    result["url"] = upload(out_dir, repo_id, result["files"], private=private)
    result["uploaded"] = True
    return result


def _check_out_dir(out_dir: Path, model_dir: Path) -> None:
    """The export's folder: not the model's own folder (its config would be rewritten), not a file, and not a
    folder of other things (an earlier export, which holds a config.json, is written over; of what it holds, only
    what this export writes is uploaded)."""
    out, source = out_dir.resolve(), Path(model_dir).resolve()
    if out == source or source in out.parents:
        raise PushError(f"{out_dir}: the export would be written into the model's own folder {model_dir}; name "
                        f"another --out-dir.")
    if out.exists() and not out.is_dir():
        raise PushError(f"{out_dir}: a file, not a folder for the export.")
    entries = list(out.iterdir()) if out.is_dir() else []
    if entries and not (out / "config.json").is_file():
        raise PushError(f"{out_dir}: holds other files, and everything in it would be uploaded; name an empty or "
                        f"new --out-dir.")
    if any(p.is_dir() for p in entries):
        raise PushError(f"{out_dir}: holds folders, which would be uploaded with the export; name an empty or new "
                        f"--out-dir.")


PUSH_KEYS = frozenset({"repo_id", "private", "dry_run", "check"})


def check_push_stage(values: dict, stages: dict, where: str) -> dict:
    """Recipe time: a push stage's keys, and a repo id that looks like ORG/NAME."""
    from .training import ConfigError

    bad = set(values) - PUSH_KEYS
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {sorted(bad)}; expected some of {sorted(PUSH_KEYS | {'init'})}.")
    repo_id = values.get("repo_id")
    if not isinstance(repo_id, str) or not is_hub_id(repo_id):
        raise ConfigError(f"{where}: repo_id must look like ORG/NAME, got {repo_id!r}.")
    for key in sorted(set(values) - {"repo_id"}):  # the others are switches: `dry_run: ""` would upload
        if not isinstance(values[key], bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {values[key]!r}.")
    return values


def run_push_stage(runner, name: str, stage) -> dict:
    """The push stage of a recipe: export the `init:` stage's model, check it, upload unless `dry_run`."""
    out = runner.stage_dir(name) / "export"
    values = stage.values
    result = export_chat_model(runner.model_dir(stage.init), out, repo_id=values["repo_id"], manifest=runner.manifest,
                               eval_table=runner.manifest.get("eval_table"), check=values.get("check", True))
    check = result.get("check")
    if check:
        runner.log(f"  export loads in vanilla transformers ({check['class']}), logits max |diff| "
                   f"{check['max_abs_diff']:.2g}")
    if values.get("dry_run", False):
        runner.log(f"  dry run: would upload {len(result['files'])} files to {values['repo_id']}: "
                   f"{', '.join(result['files'])}")
        url = None
    else:
        url = upload(out, values["repo_id"], result["files"], private=values.get("private", False))
        runner.log(f"  pushed to {url}")
    runner.manifest["export_dir"] = str(out)
    return {"inputs": {"model": runner.model_dir(stage.init)},
            "outputs": {"export": str(out), "url": url, "files": result["files"]},
            "metrics": {"vanilla_logits_max_abs_diff": check["max_abs_diff"] if check else None}}
