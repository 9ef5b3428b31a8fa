"""A readable end-of-run summary."""
from __future__ import annotations


def format_summary(m: dict) -> str:
    def fmt(v, spec=""):
        return "n/a" if v is None else format(v, spec)

    losses = m.get("losses") or []
    rows = [
        ("model / strategy / quant", f"{m['model']} / {m['strategy']} / {m['quant']}"),
        ("steps", fmt(m.get("steps"))),
        ("loss first -> last", f"{fmt(losses[0][1] if losses else None, '.4f')} -> "
                               f"{fmt(losses[-1][1] if losses else None, '.4f')}"),
        ("eval exact match", f"{fmt(m.get('eval_exact_match'), '.1%')} on {m.get('n_eval', 0)} held-out samples"),
        ("eval CER", f"{fmt(m.get('eval_cer'), '.3f')} (character edits / reference characters)"),
        ("bad samples skipped", fmt(m.get("data_skipped"))),
        *([("optimizer steps skipped", f"{m['skipped_steps']} (non-finite gradients, train.on_nonfinite=skip_step)")]
          if m.get("skipped_steps") else []),
        ("trainable params", f"{m['trainable_params']:,} of {m['total_params']:,} "
                             f"({100 * m['trainable_params'] / max(m['total_params'], 1):.2f}%)"),
        ("tokens/s (train)", fmt(m.get("tokens_per_s"), ",.0f")),
        ("peak memory", f"{fmt(m.get('peak_memory_gib'), '.2f')} GiB ({m.get('peak_memory_kind', '')})"),
        ("accelerated modules", ", ".join(f"{k}: {v}" for k, v in (m.get("accelerated") or {}).items()) or "none"),
        *([("CUDA graphs", _graphs_line(m["cuda_graphs"]))] if m.get("cuda_graphs") else []),
        ("wall time", f"{m['wall_s']:.1f} s (train {m['train_s']:.1f} s, eval {m.get('eval_s', 0):.1f} s)"),
        ("outputs", m["run_dir"]),
        *([("loss curve", m["plot"])] if m.get("plot") else []),
    ]
    w = max(len(k) for k, _ in rows)
    bar = "=" * (w + 50)
    return "\n".join([bar, "run summary", bar] + [f"{k.ljust(w)}  {v}" for k, v in rows] + [bar])


def _graphs_line(g: dict) -> str:
    line = f"{g['captured']} captured, {g['replays']:,} replays"
    copies = g.get("buffer copies")
    if copies and copies.get("skipped"):
        line += f" ({copies['skipped']:,} of {copies['made'] + copies['skipped']:,} input copies skipped)"
    if g.get("failures"):
        line += f"; {len(g['failures'])} layer type(s) without graphs: " + "; ".join(g["failures"])
    return line
