"""Hydra launcher plugin `hydra/launcher=gpus`: sweep jobs spread over a host's GPUs (harness.launcher.gpu_pool)."""
