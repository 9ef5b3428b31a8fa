"""Resolve which modules get LoRA: strategy flags + architecture registry -> an exact TargetPlan.

The plan is computed from the module tree alone, so it works on the meta device (no weights) and
is the single source of truth for the PEFT injection: PEFT receives the exact module names.
"""
from __future__ import annotations

import difflib
import json
import logging
import re
from dataclasses import asdict, dataclass, field

import torch

from harness.config import ConfigError, LoraConfig
from harness.registry import Architecture

log = logging.getLogger(__name__)

COMPONENTS = ("vision", "projector", "language")
KINDS = ("attention", "mlp", "other")


@dataclass
class Target:
    name: str
    component: str
    kind: str
    layer: int | None
    in_features: int
    out_features: int
    r: int
    alpha: float

    @property
    def lora_params(self) -> int:
        return self.r * (self.in_features + self.out_features)


@dataclass
class TargetPlan:
    model: str
    strategy: str
    targets: list[Target]
    modules_to_save: list[str] = field(default_factory=list)  # exact module names trained fully
    modules_to_save_params: int = 0
    bias_params: int = 0
    base_params: int = 0  # the model before LoRA, each parameter once (tied weights)
    warnings: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.targets]

    @property
    def lora_params(self) -> int:
        return sum(t.lora_params for t in self.targets)

    @property
    def trainable_params(self) -> int:
        return self.lora_params + self.modules_to_save_params + self.bias_params

    @property
    def total_params(self) -> int:
        """What the trained model holds (the run summary's total): the base, plus the LoRA weights, plus PEFT's
        trainable copy of each modules_to_save module (the frozen original stays in the model)."""
        return self.base_params + self.lora_params + self.modules_to_save_params

    def total_breakdown(self) -> str:
        parts = [f"base {self.base_params:,}", f"LoRA {self.lora_params:,}"]
        if self.modules_to_save_params:
            parts.append(f"modules_to_save copy {self.modules_to_save_params:,}")
        return f"total {self.total_params:,} = " + " + ".join(parts)

    def table(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(component, kind) -> (module count, LoRA params)."""
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for t in self.targets:
            n, p = out.get((t.component, t.kind), (0, 0))
            out[(t.component, t.kind)] = (n + 1, p + t.lora_params)
        return out

    def per_component(self) -> dict[str, int]:
        out = {c: 0 for c in COMPONENTS}
        for t in self.targets:
            out[t.component] += t.lora_params
        return out

    def rank_pattern(self, default_r: int) -> dict[str, int]:
        return {re.escape(t.name): t.r for t in self.targets if t.r != default_r}

    def alpha_pattern(self, default_alpha: float) -> dict[str, float]:
        return {re.escape(t.name): t.alpha for t in self.targets if t.alpha != default_alpha}

    def to_dict(self) -> dict:
        table = [
            dict(component=c, kind=k, modules=n, lora_params=p) for (c, k), (n, p) in sorted(self.table().items())
        ]
        return dict(
            model=self.model, strategy=self.strategy, lora_params=self.lora_params,
            modules_to_save=self.modules_to_save, modules_to_save_params=self.modules_to_save_params,
            bias_params=self.bias_params, trainable_params=self.trainable_params, base_params=self.base_params,
            total_params=self.total_params,
            table=table, targets=[asdict(t) for t in self.targets], warnings=self.warnings,
        )

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    def format(self) -> str:
        rows = [("component", "kind", "modules", "LoRA params")]
        for (c, k), (n, p) in sorted(self.table().items(), key=lambda kv: (COMPONENTS.index(kv[0][0]), kv[0][1])):
            rows.append((c, k, str(n), f"{p:,}"))
        rows.append(("total", "", str(len(self.targets)), f"{self.lora_params:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        line = lambda r: "  ".join(r[i].ljust(widths[i]) if i < 2 else r[i].rjust(widths[i]) for i in range(4))
        out = [f"LoRA target plan: model={self.model} strategy={self.strategy}", line(rows[0]),
               "  ".join("-" * w for w in widths)]
        out += [line(r) for r in rows[1:-1]] + ["  ".join("-" * w for w in widths), line(rows[-1])]
        if self.modules_to_save:
            out.append(f"trained fully (modules_to_save): {', '.join(self.modules_to_save)} "
                       f"({self.modules_to_save_params:,} params)")
        if self.bias_params:
            out.append(f"trainable biases: {self.bias_params:,} params")
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        out.append(f"trainable: {self.trainable_params:,} of {self.total_params:,} params ({pct:.3f}%); "
                   f"{self.total_breakdown()}")
        return "\n".join(out)


def _is_linear(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    # bitsandbytes Linear4bit / Linear8bitLt subclass nn.Linear; anything else linear-like by name
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def _matches_name(entry: str, name: str) -> bool:
    """PEFT's list semantics: the full name, or a suffix at a dot boundary."""
    return name == entry or name.endswith("." + entry)


def _suggest(entry: str, names: list[str]) -> list[str]:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    patterns = sorted({re.sub(r"\.\d+\.", ".N.", n) for n in names})
    close = difflib.get_close_matches(entry, leaves, n=3, cutoff=0.4)
    close += difflib.get_close_matches(entry, patterns, n=3, cutoff=0.4)
    return close or leaves[:8]


def _by_flags(names: list[str], arch: Architecture, lora: LoraConfig) -> list[str]:
    """The linears the finetune_* flags select: vision / language by kind (attention, mlp), the projector whole."""
    comps = {c for c, on in (("vision", lora.finetune_vision_layers), ("language", lora.finetune_language_layers),
                             ("projector", lora.finetune_projector)) if on}
    kinds = {k for k, on in (("attention", lora.finetune_attention_modules), ("mlp", lora.finetune_mlp_modules))
             if on}
    return [n for n in names if (c := arch.component(n)) in comps and (c == "projector" or arch.kind(n) in kinds)]


def _narrowed(selected: list[str], arch: Architecture, lora: LoraConfig, tm, model_name: str,
              warnings: list[str]) -> list[str]:
    """target_modules inside what the finetune_* flags select (lora.narrow_targets_by_flags, Unsloth's rule)."""
    flagged = set(_by_flags(selected, arch, lora))
    kept = [n for n in selected if n in flagged]
    if not kept:
        raise ConfigError(f"lora.target_modules={tm!r} selects zero modules of model {model_name} inside what the "
                          f"finetune_* flags of lora_strategy={lora.strategy} select; change the flags, or set "
                          "lora.narrow_targets_by_flags=false to let target_modules alone decide")
    left = len(selected) - len(kept)
    if left and tm != "all-linear":  # named explicitly: say what the flags removed
        example = next(n for n in selected if n not in flagged)
        warnings.append(f"lora.target_modules={tm!r}: {left} matching modules lie outside the finetune_* flags and "
                        f"get no LoRA (e.g. {example}); lora.narrow_targets_by_flags=false keeps them")
    return kept


def resolve_targets(model: torch.nn.Module, arch: Architecture, lora: LoraConfig, model_name: str,
                    extra_modules_to_save: list[str] | tuple = ()) -> TargetPlan:
    """Compute the exact LoRA targets of `model` (may live on the meta device)."""
    linears: dict[str, torch.nn.Linear] = {n: m for n, m in model.named_modules() if _is_linear(m)}
    head = set(arch.output_head)
    candidates = [n for n in linears if n not in head]
    warnings: list[str] = []

    tm = lora.target_modules
    if tm is not None and not lora.narrow_targets_by_flags:
        moot = [f"{k}={getattr(lora, k)}" for k in ("finetune_vision_layers", "finetune_language_layers",
                                                     "finetune_attention_modules", "finetune_mlp_modules")
                if getattr(lora, k) is False]
        if lora.finetune_projector:
            moot.append("finetune_projector=True")
        if moot:
            warnings.append(f"lora.target_modules={tm!r} overrides the strategy flags; moot: {', '.join(moot)}")
    if tm is not None:
        if tm == "all-linear":
            selected = list(candidates)
        elif isinstance(tm, str):
            try:
                rx = re.compile(tm)
            except re.error as e:
                raise ConfigError(f"invalid config: lora.target_modules={tm!r} is not a valid regex ({e})") from None
            selected = [n for n in linears if rx.fullmatch(n)]
            if not selected:
                raise ConfigError(
                    f"lora.target_modules regex {tm!r} matches no linear module of {model_name}; "
                    f"linear modules look like: {', '.join(_suggest(tm, candidates)[:6])}")
        else:
            entries = [str(e) for e in tm]
            unmatched = [e for e in entries if not any(_matches_name(e, n) for n in linears)]
            if unmatched:
                hints = "; ".join(f"{e!r} (nearest: {', '.join(_suggest(e, candidates))})" for e in unmatched)
                raise ConfigError(f"lora.target_modules entries match no linear module of {model_name}: {hints}")
            selected = [n for n in linears if any(_matches_name(e, n) for e in entries)]
        if lora.narrow_targets_by_flags:
            selected = _narrowed(selected, arch, lora, tm, model_name, warnings)
    else:
        selected = _by_flags(candidates, arch, lora)
        if not selected:
            why = []
            if lora.finetune_vision_layers and not arch.is_multimodal:
                why.append(f"{model_name} ({arch.name}) is text-only: it has no vision tower")
            if not (lora.finetune_vision_layers or lora.finetune_language_layers or lora.finetune_projector):
                why.append("all of finetune_vision_layers / finetune_language_layers / finetune_projector are false")
            if not (lora.finetune_attention_modules or lora.finetune_mlp_modules or lora.finetune_projector):
                why.append("finetune_attention_modules and finetune_mlp_modules are both false")
            raise ConfigError(
                f"lora_strategy={lora.strategy} selects zero modules of model {model_name}: "
                + ("; ".join(why) or "no linear module matches the selected components and kinds"))

    if lora.layers_to_transform is not None:
        layered = [n for n in selected if arch.layer(n) is not None]
        n_layers = 1 + max((arch.layer(n) for n in layered), default=-1)
        bad = [i for i in lora.layers_to_transform if i >= n_layers]
        if bad:
            raise ConfigError(
                f"invalid config: lora.layers_to_transform={list(lora.layers_to_transform)} has indices {bad} out of "
                f"range for {model_name}: the selected modules have layers 0..{n_layers - 1}")
        if lora.layers_pattern:
            pat = re.compile(rf"\.{lora.layers_pattern}\.(\d+)\.")
            keep = lambda n: (m := pat.search(n)) is not None and int(m.group(1)) in lora.layers_to_transform
        else:
            keep = lambda n: arch.layer(n) in lora.layers_to_transform
        selected = [n for n in selected if keep(n)]
        if not selected:
            raise ConfigError(f"lora.layers_to_transform={list(lora.layers_to_transform)} with layers_pattern="
                              f"{lora.layers_pattern!r} leaves zero modules of {model_name}")

    targets = []
    for n in selected:
        comp = arch.component(n) or "language"
        r, alpha = lora.r, lora.lora_alpha
        if comp == "vision":
            r, alpha = lora.vision_r or r, lora.vision_alpha or alpha
        elif comp == "language":
            r, alpha = lora.language_r or r, lora.language_alpha or alpha
        lin = linears[n]
        targets.append(Target(n, comp, arch.kind(n), arch.layer(n), lin.in_features, lin.out_features, r, alpha))

    # modules trained fully
    wanted = list(dict.fromkeys([*lora.modules_to_save, *extra_modules_to_save]))
    module_names = dict(model.named_modules())
    mts: list[str] = []
    for e in wanted:
        hits = [n for n in module_names if n and _matches_name(e, n)]
        if not hits:
            raise ConfigError(f"modules_to_save entry {e!r} matches no module of {model_name} "
                              f"(nearest: {', '.join(_suggest(e, list(module_names)))})")
        mts += [h for h in hits if h not in mts]
    seen: set[int] = set()
    mts_params = 0
    for n in mts:
        for p in module_names[n].parameters():
            if id(p) not in seen:
                seen.add(id(p))
                mts_params += p.numel()

    bias_params = 0
    if lora.bias == "all":
        bias_params = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias")
                          and not any(n.startswith(m + ".") for m in mts))
    elif lora.bias == "lora_only":
        bias_params = sum(linears[t.name].bias.numel() for t in targets if linears[t.name].bias is not None)

    base = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    for w in warnings:
        log.warning(w)
    return TargetPlan(model=model_name, strategy=lora.strategy, targets=targets, modules_to_save=mts,
                      modules_to_save_params=mts_params, bias_params=bias_params, base_params=base,
                      warnings=warnings)
