"""mode=replay: rerun a finished run from its saved config and compare its metrics."""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from harness.config import load_saved_run, validate


def replay(path: str | Path, out_dir: Path) -> dict:
    from harness.pipeline import train_run
    from harness.secrets import redact

    cfg, path = load_saved_run(path, "metrics.json")
    run = validate(cfg)
    before = json.loads((path / "metrics.json").read_text())
    env_file = path / "env.json"
    if env_file.exists():
        env = json.loads(env_file.read_text())
        from harness.pipeline import REPO
        from harness.provenance import environment

        now = environment(REPO)
        for k, v in env.get("packages", {}).items():
            if now["packages"].get(k) != v:
                print(f"note: {k} was {v} for the original run, now {now['packages'].get(k)}")
        if env.get("git", {}).get("commit") != now["git"]["commit"]:
            print(f"note: the original run was at git {env.get('git', {}).get('commit')}, "
                  f"now {now['git']['commit']}")
    after = train_run(run, redact(OmegaConf.to_container(cfg, resolve=True)), out_dir)
    losses_a, losses_b = [l for _, l in before["losses"]], [l for _, l in after["losses"]]
    result = {
        "identical": losses_a == losses_b and before["eval_exact_match"] == after["eval_exact_match"],
        "losses_identical": losses_a == losses_b,
        "max_loss_diff": max((abs(a - b) for a, b in zip(losses_a, losses_b)), default=0.0),
        "eval_exact_match": [before["eval_exact_match"], after["eval_exact_match"]],
    }
    (out_dir / "replay.json").write_text(json.dumps(result, indent=1))
    verdict = "identical" if result["identical"] else f"differs (max loss diff {result['max_loss_diff']:.3g})"
    print(f"replay of {path}: {verdict}; eval exact match {before['eval_exact_match']:.1%} -> "
          f"{after['eval_exact_match']:.1%}")
    return result
