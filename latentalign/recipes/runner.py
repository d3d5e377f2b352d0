"""`latentalign run RECIPE`: the stages of a recipe, one folder each, restartable at any point.

Layout of a run folder:

    runs/quickstart/
      recipe.yaml          the recipe as run (overrides applied)
      manifest.json        per stage: type, config hash, inputs, outputs, metrics, duration, status (running,
                           done, or failed with its error)
      sft/  reward/  ...   one folder per stage (checkpoints, model/, metrics.json) and its DONE marker
      report.md  report.html  plots/*.png

A stage is finished only when its `DONE` marker (holding the stage's config hash) is written, after
everything else. A rerun skips finished stages whose hash is unchanged and resumes an interrupted one from
its newest checkpoint. A stage whose settings (or an upstream stage's) changed is run again; its old folder
is kept aside as `<stage>.superseded-<hash>`, never deleted.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

from ..training import is_main_process
from .schema import Recipe, RecipeError

MARKER = "DONE"
TERMINATED = threading.Event()  # set by `stop_on_sigterm`'s handler


def stop_on_sigterm() -> None:
    """SIGTERM (`timeout`, SLURM, `docker stop`) ends the run as Ctrl-C does: the stage is recorded as failed by
    the signal (not left "running"), a rerun resumes it, and the CLI exits 143, as for the signal."""
    import signal

    def stop(signum, frame):
        TERMINATED.set()
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, stop)
LOCK = ".lock"  # held by the run writing to the folder (`Runner._lock`)


def _write_json(path: Path, data) -> None:
    """Atomic: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    """A bookkeeping file's contents: {} when there is none, None when it is not a JSON object."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _barrier() -> None:
    """Under `accelerate launch`, every process waits here until the main one has written what follows."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()  # gloo on CPU, as the trainers


class Runner:
    def __init__(self, recipe: Recipe, output_dir=None, log=print):
        import yaml

        self.recipe = recipe
        self.run_dir = Path(output_dir or recipe.output_dir or f"runs/{recipe.name}")
        self.log = log if is_main_process() else (lambda *_: None)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RecipeError(f"{self.run_dir}: a file, not a run folder; name another folder (-o).")
        self.manifest_path = self.run_dir / "manifest.json"
        foreign = sorted(p.name for p in (self.run_dir.iterdir() if self.run_dir.is_dir() else ())
                         if p.name not in ("recipe.yaml", LOCK, "manifest.json.tmp")
                         and not (p / "STAGE.json").is_file())
        if foreign and not self.manifest_path.is_file():
            raise RecipeError(f"{self.run_dir}: holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''} "
                              f"and no manifest.json: not a run folder, whose folders a run would move aside; name "
                              f"an empty or new folder (-o).")
        manifest = _read_json(self.manifest_path)
        stages = manifest.get("stages", {}) if manifest is not None else None
        if not isinstance(stages, dict) or not all(isinstance(s, dict) for s in stages.values()):
            raise RecipeError(f"{self.manifest_path}: not a JSON object whose stages are objects; this run folder's "
                              f"record of its stages is damaged. Restore it, or rerun into another folder (-o).")
        self.recipe_yaml = yaml.safe_dump(recipe.raw, sort_keys=False)
        self.manifest = {
            "recipe": recipe.name, "recipe_source": recipe.source, "recipe_yaml": self.recipe_yaml,
            "base_model": recipe.base_model or self._first_model(), "run_dir": str(self.run_dir),
            # a model card names a hub base model only; a relative folder `org/name` looks like one
            "base_model_local": Path(str(recipe.base_model or self._first_model())).exists(),
            "stages": {name: self._as_now(name, stages.get(name, {})) for name in recipe.stages},
            **self._carried_over(manifest),
        }

    def _as_now(self, name: str, entry: dict) -> dict:
        """A stage's entry from the last run, "stale" where it said done and is not under this recipe's settings
        (a run stopped before it redid the stage showed the old one as done)."""
        return {**entry, "status": "stale"} if entry.get("status") == "done" and not self.is_done(name) else entry

    def _carried_over(self, manifest: dict) -> dict:
        """What an earlier run in this folder left that still holds for this recipe: the final model is this
        recipe's last finished chat stage's, and the eval table and export are kept only when this recipe has a
        finished stage of that type (another recipe run into the folder before left its own)."""
        done = [name for name in self.recipe.stages if self.is_done(name)]
        chat = [name for name in done if self.recipe.stages[name].kind.makes_model == "chat"]
        types = {self.recipe.stages[name].type for name in done}
        pushed = [name for name in done if self.recipe.stages[name].type == "push"]
        return {"final_model": self.model_dir(chat[-1]) if chat else None,
                "eval_table": manifest.get("eval_table") if "eval" in types else None,
                "eval_stage": manifest.get("eval_stage") if "eval" in types else None,
                # this folder's, not the path the manifest holds (the folder may have moved since)
                "export_dir": str(self.stage_dir(pushed[-1]) / "export") if pushed else None,
                "report": manifest.get("report")}

    def _rerunnable_yaml(self) -> str:
        """The recipe as run, its local datasets named from the run folder (where this copy lies), so that
        `latentalign run <run>/recipe.yaml` reads the same files; the manifest and model card keep them as written."""
        import copy
        import os

        import yaml

        from .datasets import DATA_KEYS, exists

        raw = copy.deepcopy(self.recipe.raw)
        for name, stage in self.recipe.stages.items():
            written = (raw.get("stages") or {}).get(name)
            for key in DATA_KEYS & set(stage.values) if isinstance(written, dict) else ():
                value = stage.values[key]
                if isinstance(value, str) and key in written and exists(value):
                    written[key] = os.path.relpath(Path(value).resolve(), self.run_dir.resolve())
        return yaml.safe_dump(raw, sort_keys=False)

    def _first_model(self) -> str | None:
        first = next((s for s in self.recipe.stages.values() if s.kind.makes_model), None)
        return first.values.get("model", "tiny") if first else None

    # -- bookkeeping ------------------------------------------------------------------------------------------

    def _save_manifest(self):
        self.write_json(self.manifest_path, self.manifest)

    def write_json(self, path: Path, data) -> None:
        """Atomic, and by the main process only."""
        if is_main_process():
            _write_json(path, data)

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / name

    def model_dir(self, name: str) -> str:
        return str(self.stage_dir(name) / "model")

    def _marker(self, name: str) -> tuple[str, dict]:
        """(settings hash, {"made": this finish's id, "from": the ids of the upstream finishes it read}) of a
        stage's DONE marker; ("", {}) without one."""
        marker = self.stage_dir(name) / MARKER
        lines = marker.read_text().splitlines() if marker.is_file() else []
        try:
            made = json.loads(lines[1]) if len(lines) > 1 else {}
        except ValueError:
            made = {}
        return (lines[0].strip() if lines else ""), made if isinstance(made, dict) else {}

    def is_done(self, name: str) -> bool:
        """Finished under the stage's present settings, from the outputs its upstream stages have now (one made
        again since leaves it to do again), and its model (where it makes one) still there."""
        stage = self.recipe.stages[name]
        done, made = self._marker(name)
        read = made.get("from") or {}
        return (done == stage.hash
                and all(read.get(u) is None or read[u] == self._marker(u)[1].get("made") for u in stage.upstream)
                and (not stage.kind.makes_model or (Path(self.model_dir(name)) / "config.json").is_file()))

    def _prepare_dir(self, name: str):
        """Keep a folder made under other settings out of the way; keep the same settings' checkpoints."""
        folder = self.stage_dir(name)
        stamp = folder / "STAGE.json"
        stage = self.recipe.stages[name]
        made_by = _read_json(stamp) or {}  # a damaged stamp: settings unknown, the folder goes aside
        if folder.exists() and made_by.get("hash") != stage.hash:
            old = str(made_by.get("hash", "unknown"))[:12]
            aside = folder.with_name(f"{name}.superseded-{old}")
            n = 1
            while aside.exists():
                aside, n = folder.with_name(f"{name}.superseded-{old}-{n}"), n + 1
            if is_main_process():
                folder.rename(aside)
                self.log(f"  settings changed since the last run: previous {name}/ kept as {aside.name}/")
        if is_main_process():
            folder.mkdir(parents=True, exist_ok=True)
            _write_json(stamp, {"hash": stage.hash, "type": stage.type, "init": stage.init, "values": stage.values})
        _barrier()

    # -- running ----------------------------------------------------------------------------------------------

    def _lock(self) -> None:
        """One run at a time in a run folder: a second would move the first's stage folders aside or resume into
        them. The lock goes with the process (closed or killed)."""
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock
            return
        self._lock_file = open(self.run_dir / LOCK, "a+")  # noqa: SIM115 -- held for the run's lifetime
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "?"
            self._unlock()
            raise RecipeError(f"{self.run_dir}: another run is writing to this folder (process {holder}); wait for "
                              f"it to end, or name another folder (-o).") from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(f"{os.getpid()}\n")
        self._lock_file.flush()

    def _unlock(self) -> None:
        if getattr(self, "_lock_file", None) is not None:
            self._lock_file.close()  # closing the file releases the lock
            self._lock_file = None

    def run(self) -> dict:
        if is_main_process():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._lock()
        try:
            return self._run()
        finally:
            self._unlock()  # a failed run's retry in the same process (a notebook) is not locked out

    def _run(self) -> dict:
        if is_main_process():
            (self.run_dir / "recipe.yaml").write_text(self._rerunnable_yaml())
        self._save_manifest()
        _barrier()
        total = len(self.recipe.stages)
        for i, (name, stage) in enumerate(self.recipe.stages.items(), start=1):
            if TERMINATED.is_set():  # a SIGTERM that surfaced as an error something caught: no stage more
                raise SystemExit(143)
            entry = self.manifest["stages"][name]
            if self.is_done(name):
                self.log(f"[{i}/{total}] {name} ({stage.type}): done earlier, skipped")
                entry["skipped_last_run"] = True
                continue
            resuming = (_read_json(self.stage_dir(name) / "STAGE.json") or {}).get("hash") == stage.hash
            self._prepare_dir(name)
            self.log(f"[{i}/{total}] {name} ({stage.type})" + (": resuming" if resuming else ""))
            entry.clear()
            entry.update(type=stage.type, init=stage.init, hash=stage.hash, status="running",
                         started=time.strftime("%Y-%m-%dT%H:%M:%S"), skipped_last_run=False)
            self._save_manifest()
            start = time.perf_counter()
            try:
                # training kinds run in every process (they train together); eval and push in the main one
                result = stage.kind.execute(self, name, stage) if stage.kind.every_process or is_main_process() else {}
            except BaseException as err:  # the manifest says which stage stopped and why; a rerun resumes it
                error = f"{type(err).__name__}: {err}"
                if TERMINATED.is_set():  # a signal inside an import surfaces as another error
                    error = "terminated (SIGTERM)" + ("" if isinstance(err, SystemExit) else f"; then {error}")
                entry.update(status="failed", error=error[:1000],
                             seconds=round(time.perf_counter() - start, 1), finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
                try:
                    self._save_manifest()
                except OSError:  # a full disk: the error that stopped the stage is the one to see
                    pass
                raise
            entry.update(result, status="done", seconds=round(time.perf_counter() - start, 1),
                         finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
            if stage.kind.makes_model == "chat":
                self.manifest["final_model"] = self.model_dir(name)
            self._save_manifest()
            if is_main_process():
                made = {"made": uuid.uuid4().hex, "from": {u: self._marker(u)[1].get("made") for u in stage.upstream}}
                (self.stage_dir(name) / MARKER).write_text(f"{stage.hash}\n{json.dumps(made)}\n")  # last: finished
            _barrier()
        self._finish()
        return self.manifest

    def _finish(self):
        from .report import write_report

        if is_main_process():
            self.manifest["report"] = str(write_report(self.run_dir, self.manifest))
            self._save_manifest()


__all__ = ["Runner", "RecipeError"]
