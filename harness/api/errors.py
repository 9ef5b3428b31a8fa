"""API errors: a config error from harness.config.validate, re-worded to name the API's parameter."""
from __future__ import annotations

import re

from harness.config import ConfigError

# RunConfig keys whose API parameter has another name (the rest: the key's last part, e.g. lora.r -> r)
PARAMS = {
    "model.name_or_path": "model_name",
    "model.trust_remote_code": "trust_remote_code",
    "quant.mode": "load_in_4bit / load_in_8bit",
    "quant.dtype": "dtype",
    "train.full_finetuning": "full_finetuning",
    "train.gradient_checkpointing": "use_gradient_checkpointing",
    "data.max_length": "max_seq_length",
    "lora_strategy": "finetune_vision_layers / finetune_language_layers / finetune_attention_modules / "
                     "finetune_mlp_modules",
}


def api_error(where: str, e: Exception) -> ConfigError:
    """`e` (a ConfigError naming a RunConfig key) as a ConfigError (a ValueError) that names the parameter."""
    text = str(e)
    m = re.search(r"(?:invalid config: )?([A-Za-z_][\w.]*)[= ]", text)
    key = m.group(1) if m else ""
    param = PARAMS.get(key) or (key.split(".")[-1] if "." in key else key)
    return ConfigError(f"{where}: parameter {param}: {text}")


def reject_unknown(kwargs: dict, where: str, known: tuple = ()) -> None:
    """Unknown keyword arguments are a TypeError naming them, never ignored."""
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        extra = f"; harness extras allowed here: {', '.join(known)}" if known else ""
        raise TypeError(f"{where}() got unexpected keyword argument(s): {', '.join(unknown)} (not supported by "
                        f"the harness API{extra})")
