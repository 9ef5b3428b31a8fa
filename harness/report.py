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

from harness.errors import UserError

log = logging.getLogger(__name__)

COLUMNS = ["job", "overrides", "status", "model", "strategy", "quant", "trainable_params", "trainable_vision",
           "trainable_projector", "trainable_language", "loss_first", "loss_last", "eval_exact_match",
           "eval_cer", "data_skipped", "tokens_per_s", "peak_memory_gib", "wall_s", "error", "failed_stage"]

SWEEP_LAYOUT = ("a sweep directory holds one folder per job (0/, 1/, ...), each with .hydra/overrides.yaml or "
                "metrics.json, e.g. outputs/multirun/DATE/TIME")


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep: those with Hydra's overrides.yaml or a metrics.json (a report run is not a job)."""
    with_overrides = {p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")
                      if "mode=report" not in p.read_text()}
    dirs = with_overrides | {p.parent for p in sweep_dir.glob("*/metrics.json")}
    return sorted(dirs, key=lambda d: (int(d.name.split("_")[0]) if d.name.split("_")[0].isdigit() else 1 << 30,
                                       d.name))


def sweep_jobs(sweep_dir: Path) -> list[Path]:
    """job_dirs, or a UserError naming the path when it is missing or not a sweep (checked before writing)."""
    if not sweep_dir.is_dir():
        raise UserError(f"path={str(sweep_dir)!r} does not exist or is not a directory; {SWEEP_LAYOUT}")
    dirs = job_dirs(sweep_dir)
    if not dirs:
        what = ("a single run, not a sweep: pass the sweep folder above its jobs"
                if (sweep_dir / "metrics.json").exists() or (sweep_dir / ".hydra").is_dir() else "not a sweep")
        raise UserError(f"path={str(sweep_dir)!r} is {what}; {SWEEP_LAYOUT}")
    return dirs


def _read_json(path: Path) -> tuple[dict, str | None]:
    """(content, None), or ({}, why) when the file is unreadable (half written by an older harness, hand-edited).
    Bare NaN / Infinity from older runs parse to floats: they are judged below, not rejected here."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {}, f"{path.name} unreadable: {e}"
    return (obj, None) if isinstance(obj, dict) else ({}, f"{path.name} is not a JSON object")


def _finite(v) -> bool:
    """A number that can be ranked: not None, not a bool, not NaN / inf."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _nan_loss_from_before_divergence_checks(m: dict) -> bool:
    """A bare NaN / inf last loss with status ok: written before runs detected divergence (today's runs write
    null and status diverged). A null last loss with status ok (train.on_nonfinite=skip_step) is only unranked."""
    v = m.get("loss_last")
    return m.get("status") == "ok" and isinstance(v, float) and not math.isfinite(v)


def read_job(d: Path) -> dict:
    overrides_file = d / ".hydra" / "overrides.yaml"
    overrides = (yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.exists() else []
    row: dict = {"job": d.name, "overrides": " ".join(map(str, overrides)), "dir": str(d)}
    metrics, status = d / "metrics.json", d / "status.json"
    if metrics.exists():
        m, unreadable = _read_json(metrics)
        comp = m.get("trainable_by_component") or {}
        row.update({k: m.get(k) for k in ("model", "strategy", "quant", "trainable_params", "loss_first",
                                           "loss_last", "eval_exact_match", "eval_cer", "data_skipped", "tokens_per_s",
                                           "peak_memory_gib", "wall_s", "error", "failed_stage")})
        row.update(trainable_vision=comp.get("vision"), trainable_projector=comp.get("projector"),
                   trainable_language=comp.get("language"), losses=m.get("losses") or [])
        row["status"] = m.get("status") or f"unknown ({unreadable or 'metrics.json has no status'})"
        if _nan_loss_from_before_divergence_checks(m):
            row.update(status="diverged", error=f"last loss {m['loss_last']} in metrics.json")
    if status.exists():
        s, unreadable = _read_json(status)
        if s.get("status") != "ok":
            row.update(status=s.get("status") or f"unknown ({unreadable or 'status.json has no status'})",
                       error=s.get("error") or row.get("error"),
                       failed_stage=s.get("failed_stage") or row.get("failed_stage"))
    row.setdefault("status", "unknown (no metrics.json: still running, or killed)")
    return row


def rankable(row: dict) -> bool:
    """Only a job that finished ok is compared with others (bold, plots); in each column only finite values."""
    return row.get("status") == "ok"


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


# summary.md columns: header, unit formatter (None: as is), which way is better (+1 higher, -1 lower, 0 neither)
MD_COLUMNS = {
    "job": ("job", None, 0),
    "status": ("status", None, 0),
    "trainable_params": ("trainable params", lambda v: f"{int(v):,}", 0),
    "loss_last": ("last loss", lambda v: f"{v:.4f}", -1),
    "eval_exact_match": ("exact match", lambda v: f"{100 * v:.1f}%", +1),
    "eval_cer": ("CER", lambda v: f"{v:.3f}", -1),
    "tokens_per_s": ("tokens/s", lambda v: f"{v:,.0f}", +1),
    "peak_memory_gib": ("peak GiB", lambda v: f"{v:.2f}", -1),
    "wall_s": ("wall", lambda v: f"{v:.1f} s", 0),
}


def _fmt_col(col: str, v) -> str:
    f = MD_COLUMNS[col][1]
    if f is None or not _finite(v):
        return _fmt(v)
    return f(v)


def _best(rows: list[dict]) -> dict:
    """Per column with a direction: the finished job with the best value, when the jobs differ in it."""
    best = {}
    ok = [r for r in rows if rankable(r)]
    for col, (_, _, sign) in MD_COLUMNS.items():
        vals = [(r[col], r) for r in ok if _finite(r.get(col))]
        if sign and len(vals) > 1 and len({_fmt_col(col, v) for v, _ in vals}) > 1:
            best[col] = max(vals, key=lambda vr: sign * vr[0])[1]
    return best


def write_report(sweep_dir: str | Path) -> dict:
    """Write summary.csv, summary.md and PNG plots into sweep_dir; return {"rows", "failed", "files"}."""
    sweep_dir = Path(sweep_dir)
    rows = [read_job(d) for d in sweep_jobs(sweep_dir)]  # raises before anything is written
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
    md_cols = list(MD_COLUMNS)
    best = _best(rows)
    lines = [f"# Sweep report: {sweep_dir}", "", f"{len(rows)} jobs, "
             f"{sum(r['status'] == 'ok' for r in rows)} ok, {sum(r['status'] != 'ok' for r in rows)} not ok", "",
             f"overrides shared by all jobs: {' '.join(sorted(shared)) or '(none)'}", "",
             "| swept overrides | " + " | ".join(MD_COLUMNS[c][0] for c in md_cols) + " |",
             "|---|" + "|".join("---:" if MD_COLUMNS[c][1] else "---" for c in md_cols) + "|"]
    for r in rows:
        cells = []
        for c in md_cols:
            cell = _fmt_col(c, r.get(c))
            cells.append(f"**{cell}**" if cell and best.get(c) is r else cell)
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    if best:
        lines += ["", "Bold: the best finished job per column (" + ", ".join(
            f"{MD_COLUMNS[c][0]} {'highest' if MD_COLUMNS[c][2] > 0 else 'lowest'}" for c in md_cols
            if c in best) + ")."]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["", "## Failed jobs", ""] + [_failed_line(r) for r in failed]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    files.append(sweep_dir / "summary.md")
    files += _plots(sweep_dir, rows)
    return {"rows": rows, "failed": failed, "files": files, "markdown": "\n".join(lines)}


def _failed_line(r: dict) -> str:
    """One line of summary.md's failed jobs: status, the stage that failed, the error, where the traceback is."""
    stage = f" in stage {r['failed_stage']}" if r.get("failed_stage") else ""
    error = f": {r['error']}" if r.get("error") else ""
    tb = Path(r["dir"]) / "traceback.txt"
    return f"- `{r['job']}` ({r['label']}): {r['status']}{stage}{error}" + (f" (traceback: {tb})" if tb.exists() else "")


def _plots(sweep_dir: Path, rows: list[dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if rankable(r)]  # failed and diverged jobs are never ranked
    label = lambda r: r["label"]
    out = []

    fig, ax = plt.subplots(figsize=(8, 5))
    _loss_curves(ax, [(label(r), r.get("losses")) for r in ok], "Loss curves")
    out.append(_save(fig, sweep_dir / "loss_curves.png"))

    fig, ax = plt.subplots(figsize=(7, 5))
    for r in ok:
        if _finite(r.get("trainable_params")) and r["trainable_params"] > 0 and _finite(r.get("eval_exact_match")):
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


def _loss_curves(ax, series: list[tuple[str, list]], title: str) -> None:
    """Training loss per logged step, one line per (label, [[step, loss], ...]), log scale."""
    drawn = 0
    for name, losses in series:
        if losses:
            steps, values = zip(*losses)
            values = [v if _finite(v) else float("nan") for v in values]  # null (non-finite) leaves a gap
            ax.plot(steps, values, label=name, marker=".")
            drawn += 1
    ax.set(xlabel="step", ylabel="training loss", title=title)
    if drawn:
        from matplotlib.ticker import FuncFormatter

        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 0.5, 2, 6 rather than 6 x 10^0
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        if len(series) > 1:
            ax.legend(fontsize=7)


def plot_run(metrics: dict, run_dir: str | Path) -> Path | None:
    """``training.png`` in a run directory: the loss curve, with the run's headline numbers in the title.
    None (and a log line) when there is nothing to draw or plotting fails: a plot never fails a run."""
    if not metrics.get("losses"):
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        em = metrics.get("eval_exact_match")
        title = f"{metrics.get('model')} / {metrics.get('strategy')} / {metrics.get('quant')}"
        if em is not None:
            title += f": eval exact match {100 * em:.1f}% on {metrics.get('n_eval', 0)}"
        _loss_curves(ax, [("train", metrics["losses"])], title)
        ax.title.set_fontsize(9)
        return _save(fig, Path(run_dir) / "training.png")
    except Exception as err:  # noqa: BLE001 - e.g. a broken matplotlib backend: the run's results stand
        log.warning("could not draw training.png: %s", err)
        return None


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def print_report(result: dict) -> None:
    print(result["markdown"])
    print("report files: " + ", ".join(str(f) for f in result["files"]))
