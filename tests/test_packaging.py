"""Our kernels/ folder is installed as `harness.kernels` and never shadows Hugging Face's `kernels`
(transformers >= 5.2x requires that package and imports it with `from kernels import ...`)."""
import subprocess
import sys

CODE = """
import harness.kernels as hk, transformers.utils as tu
try:
    import kernels
    top = "hf" if hasattr(kernels, "get_kernel") else ("ours!" if hasattr(kernels, "lora_linear") else "empty")
except ImportError:
    top = "absent"
import bitsandbytes  # probes `kernels` too
from transformers.models.qwen2_vl import modeling_qwen2_vl  # imports `kernels` where it is available
print(hk.__name__, hasattr(hk, "lora_linear"), top)
"""


def _hf_kernels_installed(cwd) -> bool:
    p = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('kernels') is not None)"],
                       cwd=cwd, capture_output=True, text=True, timeout=60)
    return p.stdout.strip() == "True"


def test_kernels_folder_is_harness_kernels_and_not_top_level(repo, tmp_path):
    # from elsewhere, `kernels` is Hugging Face's package or absent; from the repo root (cwd first on sys.path,
    # as with `python -m harness.bench`) our folder must not take its place: Hugging Face's package is loaded
    # from the rest of sys.path where it is installed, else the folder imports as an empty module
    hf = _hf_kernels_installed(tmp_path)
    for cwd, expected in ((tmp_path, "hf" if hf else "absent"), (repo, "hf" if hf else "empty")):
        p = subprocess.run([sys.executable, "-c", CODE], cwd=cwd, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        name, api, top = p.stdout.split()[-3:]
        assert (name, api, top) == ("harness.kernels", "True", expected), (cwd, p.stdout)
