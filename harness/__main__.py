from harness.cli import main

if __name__ == "__main__":  # not on import (a spawned sweep job imports it as __mp_main__)
    main()
