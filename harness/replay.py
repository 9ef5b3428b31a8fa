"""mode=replay: rerun a finished run from its saved config and compare its metrics.

The comparison is step by step and NaN-aware (a loss that was NaN / null in both runs at a step is the same); a
replay that differs prints and writes the comparison, then raises CheckFailed (exit 1), so it can gate CI.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from omegaconf import OmegaConf

from harness.config import load_saved_run, validate
from harness.errors import CheckFailed, RunDiverged


def _is_nan(v) -> bool:
    """null (a non-finite float written by run_files.write_json) or a bare NaN from an older metrics.json."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def same_value(a, b) -> bool:
    """Equal, with NaN / null equal to NaN / null (both runs lost the number the same way)."""
    return (_is_nan(a) and _is_nan(b)) or a == b


def compare_losses(before: list, after: list) -> dict:
    """[[step, loss], ...] of two runs, step by step: a step missing on one side, NaN vs a number or two different
    numbers differ. Returns {"identical", "first_diff": {"step", "before", "after", "diff"} | None, "max_loss_diff"}."""
    a, b = ({int(s): l for s, l in losses} for losses in (before, after))
    first, max_diff = None, 0.0
    for step in sorted(a.keys() | b.keys()):
        x, y = a.get(step, "missing"), b.get(step, "missing")
        if same_value(x, y):
            continue
        numbers = all(isinstance(v, (int, float)) and not _is_nan(v) for v in (x, y))
        diff = abs(x - y) if numbers else math.inf  # a missing step or NaN vs a number: no finite distance
        max_diff = max(max_diff, diff)
        if first is None:
            first = {"step": step, "before": x, "after": y, "diff": diff}
    return {"identical": first is None, "first_diff": first, "max_loss_diff": max_diff}


def _fmt(v) -> str:
    if isinstance(v, str):
        return v  # "missing"
    return "NaN" if _is_nan(v) else f"{v:.6g}"


def _pct(v) -> str:
    return "n/a" if _is_nan(v) or not isinstance(v, (int, float)) else f"{v:.1%}"


def verdict(result: dict) -> str:
    """One line: identical, or the first step that differs, by how much, the largest difference, the eval change."""
    em = result["eval_exact_match"]
    tail = f"; eval exact match {_pct(em[0])} -> {_pct(em[1])}"
    if result["status"][0] != result["status"][1]:
        tail += f"; status {result['status'][0]} -> {result['status'][1]}"
    if result["identical"]:
        return "identical" + tail
    first = result["first_diff"]
    if first is None:
        return "differs (losses identical)" + tail
    return (f"differs: first at step {first['step']} (loss {_fmt(first['before'])} -> {_fmt(first['after'])}, "
            f"diff {first['diff']:.3g}); max loss diff {result['max_loss_diff']:.3g}" + tail)


def compare_runs(before: dict, after: dict) -> dict:
    """What replay.json holds: losses compared step by step, eval exact match and status compared NaN-aware."""
    losses = compare_losses(before.get("losses") or [], after.get("losses") or [])
    em = [before.get("eval_exact_match"), after.get("eval_exact_match")]
    status = [before.get("status", "ok"), after.get("status", "ok")]
    same = losses["identical"] and same_value(*em) and status[0] == status[1]
    return {"identical": same, "losses_identical": losses["identical"], "first_diff": losses["first_diff"],
            "max_loss_diff": losses["max_loss_diff"], "eval_exact_match": em, "status": status}


def _note_environment_changes(path: Path) -> None:
    """Print which packages and which git commit differ from the original run's env.json."""
    env_file = path / "env.json"
    if not env_file.exists():
        return
    env = json.loads(env_file.read_text())
    from harness.pipeline import REPO
    from harness.provenance import environment

    now = environment(REPO)
    for k, v in env.get("packages", {}).items():
        if now["packages"].get(k) != v:
            print(f"note: {k} was {v} for the original run, now {now['packages'].get(k)}")
    if env.get("git", {}).get("commit") != now["git"]["commit"]:
        print(f"note: the original run was at git {env.get('git', {}).get('commit')}, now {now['git']['commit']}")


def _rerun(run, cfg, out_dir: Path) -> dict:
    """The replay's metrics; a diverged replay is a result to compare (the original may have diverged too)."""
    from harness.pipeline import train_run
    from harness.secrets import redact

    try:
        return train_run(run, redact(OmegaConf.to_container(cfg, resolve=True)), out_dir)
    except RunDiverged:
        return json.loads((out_dir / "metrics.json").read_text())


def replay(path: str | Path, out_dir: Path) -> dict:
    """Rerun, compare, write replay.json into out_dir; CheckFailed (exit 1) when the replay differs."""
    from harness.run_files import write_json

    cfg, path = load_saved_run(path, "metrics.json")
    run = validate(cfg)
    before = json.loads((path / "metrics.json").read_text())  # bare NaN in older files parses to float nan
    _note_environment_changes(path)
    after = _rerun(run, cfg, out_dir)
    result = compare_runs(before, after)
    write_json(out_dir / "replay.json", result)  # non-finite numbers (an inf diff) as null
    line = f"replay of {path}: {verdict(result)}"
    print(line)
    if not result["identical"]:
        raise CheckFailed(line + f" (comparison in {out_dir / 'replay.json'})")
    return result
