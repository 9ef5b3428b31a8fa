"""Swap the fused kernels into a (PEFT-wrapped) Hugging Face model where the math matches.

``accelerate_model(model, cfg, force=False) -> {kernel_name: [module names]}``

* ``lora_linear`` / ``lora_linear_nf4``: ``peft.tuners.lora`` Linear layers with one active
  adapter, ``lora_dropout`` == Identity, no DoRA / LoRA variant, no ``lora_bias``, a frozen base
  ``torch.nn.Linear`` (or a bitsandbytes nf4 ``Linear4bit``) -> :func:`lora_linear`.
* ``rms_norm``: modules whose class name ends with ``RMSNorm`` and that follow the Llama/Qwen2
  formula (``variance_epsilon``) or Gemma's ``(1 + weight)`` formula (known Gemma classes).
* ``swiglu``: gated MLPs (``gate_proj``/``up_proj``/``down_proj`` + ``act_fn`` silu or tanh-GELU):
  fused activation, and when gate/up are both fused-LoRA layers one grouped LoRA call for both.
* ``rope``: the module-level ``apply_rotary_pos_emb`` of the modeling modules of the model's
  attention classes (a process-wide patch of that module, undone by :func:`revert_model`).
* ``cross_entropy``: the top model's forward, when called with ``labels`` and grad enabled,
  computes the loss with :func:`fused_linear_cross_entropy` from the last hidden state and returns
  ``logits=None`` (calls without labels run the original forward).

Swaps only replace ``forward`` attributes on module instances (and one module-level function
for RoPE): no parameters or buffers are added, so ``state_dict`` keys and PEFT adapter saving are
unchanged. :func:`revert_model` undoes everything.

``cfg``: a dict or object with ``enabled`` ('auto' | True | False) and booleans ``lora``,
``rms_norm``, ``rope``, ``swiglu``, ``cross_entropy`` (missing fields default to True;
``enabled`` defaults to 'auto'), ``compile`` (default False: see :mod:`compiled`; True compiles every
decoder layer / vision block with the compiler-friendly LoRA forward and leaves norms, rope and
activations to Inductor) and ``compile_backend`` (default 'inductor'). 'auto' swaps only when the model's parameters are on CUDA and
Triton imports; ``force=True`` swaps regardless of device (tests use it on CPU with
``TRITON_INTERPRET=1``; without the interpreter the swapped forwards run the PyTorch references).
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
import warnings
from collections import defaultdict

import torch
import torch.nn as nn

from ._triton_utils import HAS_TRITON
from .cross_entropy import fused_linear_cross_entropy
from .lora_linear import lora_linear, lora_linear_grouped
from .rms_norm import rms_norm
from .rope import apply_rotary_pos_emb as _fast_rope
from .swiglu import gated_act

__all__ = ["accelerate_model", "revert_model", "KernelConfig"]

_SAVED = "_harness_kernels_saved"  # instance attr: (attr name, previous value or _MISSING)
_MISSING = object()
_ROPE_PATCHED: dict = {}  # python module -> original function

_GEMMA_RMSNORMS = {"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm", "PaliGemmaRMSNorm", "Qwen3NextRMSNorm"}
_SILU = {"SiLU", "SiLUActivation"}
_GELU_TANH = {"GELUTanh", "PytorchGELUTanh", "NewGELUActivation", "GELUPytorchTanh"}


class KernelConfig:
    """Plain config object (a dict or any object with these attributes works too)."""

    def __init__(self, enabled="auto", lora=True, rms_norm=True, rope=True, swiglu=True, cross_entropy=True,
                 compile=False, compile_backend="inductor", compile_mode="default", tiled_mlp=True,
                 combo_kernels=True, lora_op=True, lora_paths=None):
        self.enabled, self.lora, self.rms_norm = enabled, lora, rms_norm
        self.rope, self.swiglu, self.cross_entropy = rope, swiglu, cross_entropy
        self.compile, self.compile_backend, self.compile_mode = compile, compile_backend, compile_mode
        self.tiled_mlp, self.combo_kernels, self.lora_op = tiled_mlp, combo_kernels, lora_op
        # the LoRA linears' kernel paths (lora_linear.set_paths: "cublas" | "auto" | per direction); None: leave them
        # as they are (the module default, or HARNESS_LORA_PATHS)
        self.lora_paths = lora_paths


_DEFAULTS = KernelConfig()  # the one place the kernel switches' defaults are spelled


def _cfg_get(cfg, name):
    """``cfg.name`` (object, dict or DictConfig), or KernelConfig's default where it is missing or None."""
    default = getattr(_DEFAULTS, name)
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    try:
        v = getattr(cfg, name)
    except Exception:
        try:
            v = cfg[name]  # omegaconf DictConfig supports both
        except Exception:
            return default
    return default if v is None else v


# --------------------------------------------------------------------------- swapping helpers
def _swap_forward(module: nn.Module, fn, keep_signature: bool = False) -> None:
    """Run ``fn(module, ...)`` as the module's forward (undone by :func:`revert_model`).

    ``keep_signature``: the replacement shows the original forward's signature to ``inspect`` (generate()
    validates its inputs against the model's forward signature: a ``(*args, **kwargs)`` forward would make it
    reject ``pixel_values``). ``forward.__func__`` is ``fn`` either way."""
    # accelerate's hooks (device_map) keep the real forward in `_old_forward`: swap that one
    attr = "_old_forward" if (hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__) else "forward"
    if _SAVED in module.__dict__:
        return
    prev = module.__dict__.get(attr, _MISSING)
    object.__setattr__(module, _SAVED, (attr, prev))
    new = method = types.MethodType(fn, module)
    if keep_signature:
        original = prev if prev is not _MISSING else types.MethodType(type(module).forward, module)

        @functools.wraps(original)
        def new(*args, **kwargs):
            return method(*args, **kwargs)

        new.__func__ = fn
    object.__setattr__(module, attr, new)


def _original_forward(module: nn.Module):
    attr, prev = module.__dict__[_SAVED]
    if prev is not _MISSING:
        return prev
    return types.MethodType(type(module).forward, module)


def revert_model(model: nn.Module) -> None:
    """Undo :func:`accelerate_model` (instance forwards and the RoPE module patch)."""
    for m in model.modules():
        saved = m.__dict__.get(_SAVED)
        if saved is None:
            continue
        attr, prev = saved
        if prev is _MISSING:
            m.__dict__.pop(attr, None)
        else:
            object.__setattr__(m, attr, prev)
        del m.__dict__[_SAVED]
        for extra in ("_harness_kernels_lora", "_harness_kernels_act", "_harness_seg_len", "_harness_nf4_plain"):
            m.__dict__.pop(extra, None)
    from .compiled import remove_segment_hooks, uncompile_layers

    uncompile_layers(model)
    remove_segment_hooks(model)
    for mod, fn in list(_ROPE_PATCHED.items()):
        mod.apply_rotary_pos_emb = fn
        _ROPE_PATCHED.pop(mod)


# --------------------------------------------------------------------------- LoRA
def _bnb_linear4bit():
    try:
        import bitsandbytes as bnb

        return bnb.nn.Linear4bit
    except Exception:
        return None


def _lora_static_info(m: nn.Module):
    """Return (adapter, is_nf4) if this PEFT LoRA layer can use the fused path, else None."""
    try:
        from peft.tuners.lora import LoraLayer
    except Exception:
        return None
    if not isinstance(m, LoraLayer) or not hasattr(m, "lora_A"):
        return None
    active = list(m.active_adapters) if hasattr(m, "active_adapters") else []
    if len(active) != 1:
        return None
    name = active[0]
    if name not in m.lora_A or name not in m.lora_B:
        return None
    if getattr(m, "use_dora", {}).get(name, False) or name in getattr(m, "lora_variant", {}):
        return None
    if getattr(m, "lora_bias", {}).get(name, False) or getattr(m.lora_B[name], "bias", None) is not None:
        return None
    if not isinstance(m.lora_dropout[name], nn.Identity):
        return None
    if getattr(m, "fan_in_fan_out", False):
        return None
    if not isinstance(m.lora_A[name], nn.Linear) or not isinstance(m.lora_B[name], nn.Linear):
        return None
    base = m.get_base_layer()
    L4 = _bnb_linear4bit()
    if L4 is not None and isinstance(base, L4):
        qs = getattr(base.weight, "quant_state", None)
        if qs is None or getattr(qs, "quant_type", None) != "nf4":
            return None
        return name, True
    if type(base) is nn.Linear:
        if base.weight.requires_grad:
            return None  # the fused path computes no dW for trained base weights
        return name, False
    return None


def swap_lora_forward(m: nn.Module, forward) -> str | None:
    """Swap ``forward`` into ``m`` if it is an eligible PEFT LoRA layer; return its report key
    ('lora_linear' / 'lora_linear_nf4') or None."""
    info = _lora_static_info(m)
    if info is None:
        return None
    object.__setattr__(m, "_harness_kernels_lora", info)
    _swap_forward(m, forward)
    return "lora_linear_nf4" if info[1] else "lora_linear"


def _lora_call_args(m: nn.Module):
    """Arguments for lora_linear, or None when the fused path does not apply right now."""
    info = m.__dict__.get("_harness_kernels_lora")
    if info is None:
        return None
    name, is_nf4 = info
    if m.disable_adapters or m.merged or list(m.active_adapters) != [name]:
        return None
    if not isinstance(m.lora_dropout[name], nn.Identity):
        return None
    base = m.get_base_layer()
    A, B, s = m.lora_A[name].weight, m.lora_B[name].weight, m.scaling[name]
    if is_nf4:
        w = base.weight
        return None, base.bias, A, B, s, (w.data, w.quant_state)
    if base.weight.requires_grad:
        return None
    return base.weight, base.bias, A, B, s, None


def _fused_lora_forward(self, x, *args, **kwargs):
    call = None if (args or kwargs) else _lora_call_args(self)
    if call is None:
        return _original_forward(self)(x, *args, **kwargs)
    w, b, A, B, s, nf4 = call
    return lora_linear(x, w, b, A, B, s, nf4=nf4)


# --------------------------------------------------------------------------- RMSNorm
def _rms_kind(m: nn.Module):
    cls = type(m).__name__
    if not cls.endswith("RMSNorm"):
        return None
    w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        return None
    if cls in _GEMMA_RMSNORMS and isinstance(getattr(m, "eps", None), float):
        return "eps", True
    if isinstance(getattr(m, "variance_epsilon", None), float):
        return "variance_epsilon", False
    return None


def _make_rms_forward(eps_attr: str, offset: bool):
    def forward(self, hidden_states):
        return rms_norm(hidden_states, self.weight, getattr(self, eps_attr), offset)

    return forward


# --------------------------------------------------------------------------- gated MLP
def _mlp_act(m: nn.Module):
    if not all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return None
    act = m.act_fn
    name = type(act).__name__
    if name in _SILU:
        return "silu"
    if name in _GELU_TANH or (isinstance(act, nn.GELU) and act.approximate == "tanh"):
        return "gelu_tanh"
    return None


def _mlp_forward(self, x):
    act = self.__dict__["_harness_kernels_act"]
    g_call = _lora_call_args(self.gate_proj) if "_harness_kernels_lora" in self.gate_proj.__dict__ else None
    u_call = _lora_call_args(self.up_proj) if "_harness_kernels_lora" in self.up_proj.__dict__ else None
    if g_call is not None and u_call is not None:
        gate, up = lora_linear_grouped(
            x,
            [g_call[0], u_call[0]], [g_call[1], u_call[1]], [g_call[2], u_call[2]],
            [g_call[3], u_call[3]], [g_call[4], u_call[4]], nf4s=[g_call[5], u_call[5]],
        )
    else:
        gate, up = self.gate_proj(x), self.up_proj(x)
    return self.down_proj(gated_act(gate, up, act))


# --------------------------------------------------------------------------- cross-entropy
TOP1_STATS = "_harness_top1"  # set by _ce_forward on the LM module: (top-1 hits, labelled tokens) of its last call


def fused_loss_module(model: nn.Module) -> nn.Module | None:
    """The LM module whose loss is the fused cross-entropy (swapped in by :func:`accelerate_model`), or None."""
    _, lm = _find_lm_model(model)
    if lm is None or _SAVED not in lm.__dict__:
        return None
    attr = lm.__dict__[_SAVED][0]
    fn = getattr(lm.__dict__.get(attr), "__func__", None)
    return lm if fn is _ce_forward else None


def _plain_head(head) -> nn.Linear | None:
    """The ``nn.Linear`` a forward would run as the LM head: the head itself, or, for a head trained as a PEFT
    ``modules_to_save`` module, the active adapter's trainable copy (the original when adapters are off).
    None for anything else (another wrapper, several active adapters): the model's own loss runs then."""
    if type(head) is nn.Linear:
        return head
    if type(head).__name__ != "ModulesToSaveWrapper" or type(getattr(head, "original_module", None)) is not nn.Linear:
        return None
    active = head.active_adapters
    # as the wrapper's forward picks: the original when adapters are off or an active one is not its own
    if head.disable_adapters or not active or any(a not in head._adapters for a in active):
        return head.original_module
    if active[0] not in head.modules_to_save:
        return None
    copy = head.modules_to_save[active[0]]
    return copy if type(copy) is nn.Linear else None


def _ce_forward(self, *args, **kwargs):
    orig = _original_forward(self)
    # the labelled rows from the collator (harness.loss_rows): the loss's business, never the model's
    loss_rows = kwargs.pop("loss_rows", None)
    labels = kwargs.get("labels")
    ltk = kwargs.get("logits_to_keep", 0)
    if (
        labels is None
        or args
        or not torch.is_grad_enabled()
        or (isinstance(ltk, int) and ltk != 0)
        or torch.is_tensor(ltk)
        or kwargs.get("return_dict") is False
        or "adapter_names" in kwargs  # PEFT's mixed-adapter batches: the wrapper routes rows itself
        or _plain_head(getattr(self, "lm_head", None)) is None
    ):
        return orig(*args, **kwargs)
    head = _plain_head(self.lm_head)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    kw = dict(kwargs)
    labels = kw.pop("labels")
    kw.pop("logits_to_keep", None)
    num_items = kw.pop("num_items_in_batch", None)
    shift_labels = kw.pop("shift_labels", None)
    ignore_index = kw.pop("ignore_index", -100)
    outputs = self.model(**kw)
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    own_shift = shift_labels is None
    if own_shift:
        labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:].contiguous()
    shift_labels = shift_labels.to(hidden.device)
    cfg = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
    softcap = getattr(cfg, "final_logit_softcapping", None)
    kept = None
    prep = kw.get("host_prep")  # harness.host_prep: the labelled rows, from the host
    if prep is not None and getattr(prep, "label_rows", None) is not None and own_shift and ignore_index == -100:
        dev_prep = prep.to(hidden.device)
        kept = (dev_prep.label_rows, dev_prep.n_labels)
    elif loss_rows is not None and own_shift and ignore_index == -100:
        dev_rows = loss_rows.to(hidden.device)
        kept = (dev_rows.rows, dev_rows.n)
    top1 = torch.zeros((), dtype=torch.float32, device=hidden.device)
    loss = fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), head.weight, shift_labels.reshape(-1),
        ignore_index=ignore_index, softcap=softcap, num_items_in_batch=num_items, bias=head.bias,
        kept=kept, top1=top1,
    )
    out = CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=getattr(outputs, "past_key_values", None),
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
    )
    # token accuracy without the logits: top-1 hits and labelled tokens, left on the device (the count known on
    # the host when kept): harness.train's trainer takes them after each step and reads them when it logs. On
    # the module, not the output: accelerate's mixed-precision wrapper rebuilds the output object.
    self.__dict__[TOP1_STATS] = (top1, kept[1] if kept is not None else (shift_labels != ignore_index).sum())
    return out


def _find_lm_model(model: nn.Module):
    """The HF *ForCausalLM / *ForConditionalGeneration module under PEFT wrappers, with its name."""
    for name, m in model.named_modules():
        cls = type(m).__name__
        if (cls.endswith("ForCausalLM") or cls.endswith("ForConditionalGeneration")) and hasattr(m, "lm_head") and hasattr(m, "model"):
            return name, m
    return None, None


# --------------------------------------------------------------------------- entry point
def _model_on_cuda(model: nn.Module) -> bool:
    for p in model.parameters():
        return p.is_cuda
    return False


def _plain_function(fn):
    """The function behind a hub-kernelizable stand-in (with Hugging Face's `kernels` installed, transformers
    turns module-level functions such as ``apply_rotary_pos_emb`` into small modules whose forward calls the
    original, a closure variable), else ``fn`` itself."""
    if isinstance(fn, nn.Module):
        for cell in getattr(type(fn).forward, "__closure__", None) or ():
            if inspect.isfunction(cell.cell_contents):
                return cell.cell_contents
    return fn


def accelerate_model(model: nn.Module, cfg=None, force: bool = False) -> dict:
    """Swap fused kernels into ``model`` in place; return ``{kernel_name: [module names]}``.

    ``cfg.enabled``: False -> nothing; 'auto' (default) -> only if the model is on CUDA and
    Triton is importable; True -> like 'auto' but warns when it cannot swap. ``force=True``
    swaps on any device (for tests under TRITON_INTERPRET=1).
    """
    enabled = _cfg_get(cfg, "enabled")
    if isinstance(enabled, str) and enabled.lower() in ("false", "off", "no", "0"):
        enabled = False
    if enabled is False:
        return {}
    if not force:
        if not (HAS_TRITON and _model_on_cuda(model)):
            if enabled is True or (isinstance(enabled, str) and enabled.lower() == "true"):
                warnings.warn("accelerate_model: model not on CUDA or Triton missing; kernels not swapped")
            return {}
    report: dict[str, list[str]] = defaultdict(list)
    want_lora = bool(_cfg_get(cfg, "lora"))
    if want_lora and _cfg_get(cfg, "lora_paths") is not None:
        from .lora_linear import set_paths

        set_paths(str(_cfg_get(cfg, "lora_paths")))
    want_rms = bool(_cfg_get(cfg, "rms_norm"))
    want_rope = bool(_cfg_get(cfg, "rope"))
    want_act = bool(_cfg_get(cfg, "swiglu"))
    want_ce = bool(_cfg_get(cfg, "cross_entropy"))
    want_compile = _cfg_get(cfg, "compile")
    if isinstance(want_compile, str):
        want_compile = want_compile.lower() in ("true", "auto", "on", "yes", "1")
    if want_compile:
        from .compiled import compile_layers, prepare_for_compile

        # inside compiled layers the compiler fuses norms / rope / activations with their neighbours;
        # the hand-written kernels are for eager mode
        report.update(prepare_for_compile(model, want_lora, bool(_cfg_get(cfg, "tiled_mlp")),
                                          lora_op=bool(_cfg_get(cfg, "lora_op"))))
        want_lora = want_rms = want_rope = want_act = False

    for name, m in model.named_modules():
        if want_lora:
            kind = swap_lora_forward(m, _fused_lora_forward)
            if kind is not None:
                report[kind].append(name)
                continue
        if want_rms:
            kind = _rms_kind(m)
            if kind is not None:
                _swap_forward(m, _make_rms_forward(*kind))
                report["rms_norm"].append(name)
                continue
        if want_act:
            act = _mlp_act(m)
            if act is not None:
                object.__setattr__(m, "_harness_kernels_act", act)
                _swap_forward(m, _mlp_forward)
                report["swiglu" if act == "silu" else "geglu"].append(name)
                continue

    if want_rope:
        for name, m in model.named_modules():
            cls = type(m).__name__
            if not cls.endswith("Attention"):
                continue
            pymod = sys.modules.get(type(m).__module__)
            fn = getattr(pymod, "apply_rotary_pos_emb", None) if pymod is not None else None
            if fn is None or not callable(fn):
                continue
            try:  # only attention classes that actually call the module-level function
                if "apply_rotary_pos_emb(" not in inspect.getsource(inspect.unwrap(type(m).forward)):
                    continue
            except (OSError, TypeError):
                continue
            if pymod not in _ROPE_PATCHED:
                try:
                    params = list(inspect.signature(_plain_function(fn)).parameters)
                except (TypeError, ValueError):
                    continue
                if params[:4] != ["q", "k", "cos", "sin"]:
                    continue
                _ROPE_PATCHED[pymod] = fn
                pymod.apply_rotary_pos_emb = _fast_rope
            report["rope"].append(name)

    if want_ce:
        name, lm = _find_lm_model(model)
        if lm is not None and _plain_head(lm.lm_head) is not None:  # also a head trained via modules_to_save
            _swap_forward(lm, _ce_forward, keep_signature=True)
            report["cross_entropy"].append(name)
    if want_compile:
        mode = _cfg_get(cfg, "compile_mode")
        report["compiled_layers"] = compile_layers(model, backend=_cfg_get(cfg, "compile_backend"),
                                                   mode=None if mode == "default" else mode,
                                                   combo_kernels=bool(_cfg_get(cfg, "combo_kernels")))
    return dict(report)
