"""Our kernels/ folder is installed as `harness.kernels` and never shadows Hugging Face's `kernels`."""
import subprocess
import sys

CODE = """
import harness.kernels as hk, transformers.utils as tu
try:
    import kernels
    top = "empty" if not hasattr(kernels, "lora_linear") and not hasattr(kernels, "get_kernel") else "API!"
except ImportError:
    top = "absent"
import bitsandbytes  # probes `kernels` too
print(hk.__name__, tu.is_kernels_available(), top)
"""


def test_kernels_folder_is_harness_kernels_and_not_top_level(repo, tmp_path):
    # from elsewhere `kernels` is simply absent; from the repo root (cwd on sys.path) our folder imports as
    # an empty top-level `kernels`: no version, no API, exactly as if Hugging Face's package were not installed
    for cwd, expected in ((tmp_path, "absent"), (repo, "empty")):
        p = subprocess.run([sys.executable, "-c", CODE], cwd=cwd, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        name, hf_available, top = p.stdout.split()[-3:]
        assert (name, hf_available, top) == ("harness.kernels", "False", expected), p.stdout
