"""Sweep report: one row per job (overrides, params, loss, eval metric, speed, memory, status) + plots.

Written at the end of every --multirun by `SweepReportCallback`, and on demand with
`harness mode=report path=SWEEP_DIR`. Reads only what jobs left in their directories.
"""
from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

COLUMNS = ["job", "overrides", "status", "model", "strategy", "quant", "trainable_params", "trainable_vision",
           "trainable_projector", "trainable_language", "loss_first", "loss_last", "eval_exact_match",
           "eval_cer", "data_skipped", "tokens_per_s", "peak_memory_gib", "wall_s", "error"]


def job_dirs(sweep_dir: Path) -> list[Path]:
    dirs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")
            if "mode=report" not in p.read_text()]  # a report run is not a job
    return sorted(dirs, key=lambda d: (int(d.name.split("_")[0]) if d.name.split("_")[0].isdigit() else 1 << 30,
                                       d.name))


def read_job(d: Path) -> dict:
    overrides = yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text()) or []
    row: dict = {"job": d.name, "overrides": " ".join(overrides), "dir": str(d)}
    metrics, status = d / "metrics.json", d / "status.json"
    if metrics.exists():
        m = json.loads(metrics.read_text())
        comp = m.get("trainable_by_component") or {}
        row.update({k: m.get(k) for k in ("status", "model", "strategy", "quant", "trainable_params", "loss_first",
                                           "loss_last", "eval_exact_match", "eval_cer", "data_skipped", "tokens_per_s",
                                           "peak_memory_gib", "wall_s")})
        row.update(trainable_vision=comp.get("vision"), trainable_projector=comp.get("projector"),
                   trainable_language=comp.get("language"), losses=m.get("losses") or [])
    if status.exists():
        s = json.loads(status.read_text())
        if s.get("status") != "ok":
            row.update(status=s.get("status", "failed"), error=s.get("error"))
    row.setdefault("status", "unknown (no metrics.json: still running, or killed)")
    return row


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def write_report(sweep_dir: str | Path) -> dict:
    """Write summary.csv, summary.md and PNG plots into sweep_dir; return {"rows", "failed", "files"}."""
    sweep_dir = Path(sweep_dir)
    rows = [read_job(d) for d in job_dirs(sweep_dir)]
    # label jobs by what differs between them (the swept keys), not by overrides they all share
    per_job = [r["overrides"].split() for r in rows]
    shared = set.intersection(*map(set, per_job)) if per_job else set()
    for r, ov in zip(rows, per_job):
        r["label"] = " ".join(o for o in ov if o not in shared) or r["overrides"] or "(defaults)"
    files = []
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    files.append(sweep_dir / "summary.csv")
    md_cols = ["job", "status", "trainable_params", "loss_last", "eval_exact_match", "eval_cer", "tokens_per_s",
               "peak_memory_gib", "wall_s"]
    lines = [f"# Sweep report: {sweep_dir}", "", f"{len(rows)} jobs, "
             f"{sum(r['status'] == 'ok' for r in rows)} ok, {sum(r['status'] != 'ok' for r in rows)} not ok", "",
             f"overrides shared by all jobs: {' '.join(sorted(shared)) or '(none)'}", "",
             "| swept overrides | " + " | ".join(md_cols) + " |", "|---" * (len(md_cols) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['label']} | " + " | ".join(_fmt(r.get(c)) for c in md_cols) + " |")
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += ["", "## Failed jobs", ""] + [f"- `{r['job']}`: {r['error']} (traceback: "
                                              f"{Path(r['dir']) / 'traceback.txt'})" for r in errors]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    files.append(sweep_dir / "summary.md")
    files += _plots(sweep_dir, rows)
    failed = [r for r in rows if r["status"] != "ok"]
    return {"rows": rows, "failed": failed, "files": files, "markdown": "\n".join(lines)}


def _plots(sweep_dir: Path, rows: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    label = lambda r: r["label"]
    out = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in ok:
        if r.get("losses"):
            steps, losses = zip(*r["losses"])
            ax.plot(steps, losses, label=label(r), marker=".")
    ax.set(xlabel="step", ylabel="training loss", title="Loss curves", yscale="log")
    if ok:
        ax.legend(fontsize=7)
    out.append(_save(fig, sweep_dir / "loss_curves.png"))

    fig, ax = plt.subplots(figsize=(7, 5))
    for r in ok:
        if r.get("trainable_params") and r.get("eval_exact_match") is not None:
            ax.scatter(r["trainable_params"], r["eval_exact_match"])
            ax.annotate(label(r), (r["trainable_params"], r["eval_exact_match"]), fontsize=7)
    ax.set(xlabel="trainable parameters", ylabel="eval exact match", title="Eval metric vs trainable params",
           xscale="log")
    out.append(_save(fig, sweep_dir / "metric_vs_params.png"))

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    names = [label(r) for r in ok]
    a1.barh(names, [r.get("tokens_per_s") or 0 for r in ok])
    a1.set(xlabel="tokens/s (train)", title="Throughput")
    a2.barh(names, [r.get("peak_memory_gib") or 0 for r in ok], color="tab:orange")
    a2.set(xlabel="peak memory (GiB)", title="Memory")
    a2.set_yticks([])
    for a in (a1, a2):
        a.tick_params(labelsize=7)
    out.append(_save(fig, sweep_dir / "throughput_memory.png"))
    return out


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def print_report(result: dict) -> None:
    print(result["markdown"])
    print("report files: " + ", ".join(str(f) for f in result["files"]))
