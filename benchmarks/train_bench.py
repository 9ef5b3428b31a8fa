"""Training-step benchmark (kept for the commands in docs/benchmarks.md): see harness/bench.py."""
from harness.bench import main

if __name__ == "__main__":
    main()
