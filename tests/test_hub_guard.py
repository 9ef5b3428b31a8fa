"""bitsandbytes is imported without reaching the Hub for a kernel (remote code), unless trust_remote_code."""
import subprocess
import sys

import pytest

PROBE = """
import sys
import huggingface_hub
calls = []
def overview(self, *a, **k):
    calls.append(a)
    raise OSError("network call")
huggingface_hub.HfApi.get_organization_overview = overview
from harness.hub_guard import import_bitsandbytes
{body}
import bitsandbytes
print("calls", len(calls), "offline-after", huggingface_hub.constants.HF_HUB_OFFLINE)
"""


def _run(body, tmp_path):
    p = subprocess.run([sys.executable, "-c", PROBE.format(body=body)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=180, env={k: v for k, v in __import__("os").environ.items() if k != "HF_HUB_OFFLINE"})
    assert p.returncode == 0, p.stderr[-2000:]
    _, calls, _, offline = p.stdout.split()[-4:]
    return int(calls), offline, p.stderr


def test_bitsandbytes_import_does_not_ask_the_hub(tmp_path):
    pytest.importorskip("bitsandbytes")
    calls, offline, err = _run("import_bitsandbytes()", tmp_path)
    assert calls == 0 and offline == "False"  # the Hub's offline switch is restored after the import
    assert "kernels-community" not in err
    # where bitsandbytes probes at all (Hugging Face's `kernels` installed, an AVX512-BF16 CPU), the plain
    # import does reach the Hub: the guard above is what kept it from doing so
    unguarded, _, _ = _run("", tmp_path)
    allowed, _, _ = _run("import_bitsandbytes(allow_hub_kernels=True)", tmp_path)
    assert unguarded == allowed
    if unguarded == 0:
        pytest.skip("bitsandbytes does not probe the Hub here (no `kernels` package or no AVX512-BF16)")
