"""Importing bitsandbytes without fetching code from the Hub.

With Hugging Face's ``kernels`` package installed (transformers >= 5.2x requires it), bitsandbytes' CPU backend,
on CPUs with AVX512-BF16, asks the Hub at import time for a kernel (``kernels-community/quantization-bitsandbytes``)
and downloads and runs it when its publisher is trusted there. That is remote code fetched at run time, which
``model.trust_remote_code=false`` (the default) rules out; so bitsandbytes is imported first, here, with the Hub in
offline mode: the probe finds no cached kernel and bitsandbytes keeps its own CPU code, with no network call.
"""
from __future__ import annotations

import contextlib
import logging
import sys


def import_bitsandbytes(allow_hub_kernels: bool = False) -> None:
    """Import bitsandbytes (if installed and not yet imported); unless ``allow_hub_kernels``, with the Hub offline
    for the import and the probe's expected notices (no cached kernel) silenced."""
    if "bitsandbytes" in sys.modules:
        return
    if allow_hub_kernels:
        with contextlib.suppress(ImportError):
            import bitsandbytes  # noqa: F401
        return
    try:
        import huggingface_hub.constants as hub
    except ImportError:
        return
    offline, level = hub.HF_HUB_OFFLINE, logging.root.manager.disable
    hub.HF_HUB_OFFLINE = True  # read at call time by `kernels` (local_files_only) and the download functions
    logging.disable(logging.WARNING)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    finally:
        hub.HF_HUB_OFFLINE = offline
        logging.disable(level)
