"""VLM/LLM LoRA experiment harness."""

__version__ = "0.1.0"

# The Python API (harness/api/), imported on first use: `import harness` (the CLI's startup) stays free of
# torch / transformers.
_API = ("FastVisionModel", "FastLanguageModel", "VisionDataCollator", "UnslothVisionDataCollator",
        "harness_run_config", "harness_plan", "cli_overrides")


def __getattr__(name):
    if name in _API:
        from harness import api

        return getattr(api, name)
    raise AttributeError(f"module 'harness' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])
