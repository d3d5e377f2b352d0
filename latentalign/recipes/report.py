"""The run report: report.md and report.html with PNG plots, written at the end of `latentalign run`.

Per training stage, one figure with the curves its log has: loss, reward, token or pairwise accuracy, KL to
the reference, and the expert load (normalised entropy of tokens per expert: 1.0 is perfectly even). Then the
table of metrics after each stage, from the eval stage when the recipe has one.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

PANELS = [
    ("loss", ["loss"]),
    ("reward", ["reward"]),
    ("accuracy", ["mean_token_accuracy", "accuracy", "rewards/math_accuracy/mean"]),
    ("KL", ["kl"]),
    ("expert load entropy", ["moe/load_entropy"]),
]


def _series(log_history: list[dict], key: str) -> tuple[list, list]:
    points = [(h["step"], h[key]) for h in log_history if key in h and "step" in h and "train_runtime" not in h]
    return [p[0] for p in points], [float(p[1]) for p in points]


def plot_stage(name: str, log_history: list[dict], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for title, keys in PANELS:
        curves = [(k, *_series(log_history, k)) for k in keys]
        curves = [c for c in curves if c[1]]
        if curves:
            panels.append((title, curves))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.6), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels):
        for key, steps, values in curves:
            ax.plot(steps, values, label=key, linewidth=1.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(curves) > 1:
            ax.legend(fontsize=6)
    fig.suptitle(name, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_accuracy(results: dict, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(stage, m["accuracy"]) for stage, m in results.items() if "accuracy" in m]
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(bars), 2.6))
    ax.bar([b[0] for b in bars], [100 * b[1] for b in bars], color="#4a7bb7")
    for i, (_, value) in enumerate(bars):
        ax.text(i, 100 * value, f"{value:.1%}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("held-out exact match (%)", fontsize=8)
    ax.set_title("accuracy after each stage", fontsize=10)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_report(run_dir, manifest: dict) -> Path:
    run_dir = Path(run_dir)
    plots = run_dir / "plots"
    md = [f"# Run report: {manifest['recipe']}", "", f"Recipe: `{manifest['recipe_source']}`", ""]
    body = [f"<h1>Run report: {html.escape(manifest['recipe'])}</h1>",
            f"<p>Recipe: <code>{html.escape(manifest['recipe_source'])}</code></p>"]

    md += ["## Stages", "", "| stage | type | starts from | status | steps | seconds |", "|---|---|---|---|---|---|"]
    rows = []
    for name, stage in manifest["stages"].items():
        steps = (stage.get("metrics") or {}).get("global_step", "-") if stage.get("type") != "eval" else "-"
        cells = [name, stage.get("type", "-"), stage.get("init") or (stage.get("inputs") or {}).get("model", "-"),
                 stage.get("status", "not run"), steps, stage.get("seconds", "-")]
        md.append("| " + " | ".join(str(c) for c in cells) + " |")
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    body.append("<h2>Stages</h2><table border=1 cellpadding=4><tr><th>stage</th><th>type</th><th>starts from</th>"
                "<th>status</th><th>steps</th><th>seconds</th></tr>" + "".join(rows) + "</table>")

    if manifest.get("eval_table"):
        md += ["", "## Metrics after each stage", "", manifest["eval_table"], ""]
        body.append("<h2>Metrics after each stage</h2>" + _table_html(manifest["eval_table"]))
        evals = [s for s in manifest["stages"].values() if s.get("type") == "eval"]
        named = manifest.get("eval_stage")
        eval_stage = manifest["stages"].get(named) if isinstance(named, str) else None
        eval_stage = eval_stage or (evals[-1] if evals else None)
        if eval_stage and isinstance(eval_stage.get("metrics"), dict):
            png = plot_accuracy(eval_stage["metrics"], plots / "accuracy.png")
            if png:
                md.append(f"![accuracy after each stage](plots/{png.name})")
                body.append(f'<img src="plots/{png.name}">')

    md += ["", "## Training curves", ""]
    body.append("<h2>Training curves</h2>")
    for name, stage in manifest["stages"].items():
        recorded = (stage.get("outputs") or {}).get("metrics")
        if not isinstance(recorded, str):
            continue
        # the stage's folder in this run folder: the recorded path is seen from where the stage ran
        metrics_file = next((f for f in (run_dir / name / Path(recorded).name, Path(recorded)) if f.is_file()), None)
        if metrics_file is None:
            continue
        history = json.loads(Path(metrics_file).read_text()).get("log_history", [])
        png = plot_stage(name, history, plots / f"{name}.png")
        if png:
            md.append(f"![{name}](plots/{png.name})")
            body.append(f'<h3>{html.escape(name)}</h3><img src="plots/{png.name}">')
    if manifest.get("export_dir"):
        md += ["", f"Exported chat model: `{manifest['export_dir']}`"]
        body.append(f"<p>Exported chat model: <code>{html.escape(manifest['export_dir'])}</code></p>")

    (run_dir / "report.md").write_text("\n".join(md) + "\n")
    (run_dir / "report.html").write_text("<!doctype html><meta charset=utf-8><title>latentalign run</title>"
                                         "<body style='font-family:sans-serif'>" + "\n".join(body) + "</body>\n")
    return run_dir / "report.md"


def _table_html(markdown: str) -> str:
    lines = [line.strip().strip("|").split("|") for line in markdown.splitlines() if not line.startswith("|---")]
    cells = [[html.escape(c.strip()) for c in line] for line in lines]
    head = "".join(f"<th>{c}</th>" for c in cells[0])
    rows = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
    return f"<table border=1 cellpadding=4><tr>{head}</tr>{rows}</table>"
