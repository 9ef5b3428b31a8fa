#!/usr/bin/env bash
# Wheels for the peer stacks of `harness mode=bench` (harness/bench_peers.py: liger16, liger4, unsloth16,
# unsloth4), for the GPU machine, which has no package index: downloaded here into .whl/peers/ (git-ignored)
# and carried there with the working tree (64 MiB limit for the whole tree, so keep this small).
#
#   benchmarks/fetch_peer_wheels.sh            # from the repository root (or anywhere inside it)
#
# On the GPU machine, after the project's other wheels:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/peers/*.whl
#
# What is fetched, and why nothing else:
#   liger-kernel 0.8.5, unsloth 2026.10.9, unsloth_zoo 2026.10.9 (unsloth requires unsloth_zoo>=2026.10.9).
#   Their other Requires-Dist are either on the GPU machine already (torch 2.11, transformers 5.17, peft,
#   triton, accelerate, numpy, psutil, tqdm, regex, requests, pillow, packaging, protobuf, sentencepiece,
#   huggingface-hub, typer, rich, einops, pyyaml, ...: /work/.library/device/KINDS.md), carried by the project
#   (.whl/w: trl, datasets; .whl/site: bitsandbytes), or not imported on the path these stacks take:
#   tyro, hf_transfer, diffusers, json5, nest-asyncio, structlog: never imported, or only probed with find_spec;
#   pydantic, torchao, xformers, cut_cross_entropy, msgspec: imported inside try/except, or only for fp8,
#   vLLM or saving (cut cross-entropy is switched off by unsloth_zoo itself on torch >= 2.8).
#   Checked by importing unsloth and building + training a tiny Qwen2-VL through harness/bench_peers.py on a
#   CPU with only the GPU machine's package set on the path.
#
# The unsloth wheel is 28.6 MB, of which the Studio web app (studio/) and the `unsloth` CLI (unsloth_cli/) are
# 81 MB unpacked and never imported by the library; they are dropped from the wheel (RECORD rewritten), which
# leaves it at about 2 MB. Set KEEP_FULL_UNSLOTH=1 to keep the wheel as published.
set -euo pipefail

cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
DEST=.whl/peers
PY=${PYTHON:-python3}
PACKAGES=(liger-kernel==0.8.5 unsloth==2026.10.9 unsloth_zoo==2026.10.9)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two of one package stop the whole install
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PACKAGES[@]}"

if [ "${KEEP_FULL_UNSLOTH:-0}" != 1 ]; then
  "$PY" - "$DEST"/unsloth-*-py3-none-any.whl <<'EOF'
"""Rewrite the unsloth wheel without studio/ and unsloth_cli/ (and the console script that points at the CLI)."""
import base64, hashlib, os, sys, zipfile

DROP = ("studio/", "unsloth_cli/")
path = sys.argv[1]
tmp = path + ".tmp"
with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
    record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
    rows = []
    for info in src.infolist():
        name = info.filename
        if name == record_name or name.startswith(DROP) or name.endswith(".dist-info/entry_points.txt"):
            continue
        data = src.read(name)
        dst.writestr(info, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{name},sha256={digest},{len(data)}")
    rows.append(f"{record_name},,")
    dst.writestr(record_name, "\n".join(rows) + "\n")
os.replace(tmp, path)
print(f"slimmed {os.path.basename(path)}: {os.path.getsize(path) / 2**20:.1f} MiB")
EOF
fi

for whl in "$DEST"/*.whl; do
  "$PY" - "$whl" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    bad = z.testzip()
    assert bad is None, f"corrupt member {bad} in {sys.argv[1]}"
    assert any(n.endswith(".dist-info/METADATA") for n in z.namelist()), f"no METADATA in {sys.argv[1]}"
EOF
done
ls -l "$DEST"
du -sh "$DEST"
