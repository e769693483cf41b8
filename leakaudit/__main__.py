"""`python -m leakaudit` is the same as the `leakaudit` command."""

from leakaudit.cli import main

if __name__ == "__main__":  # not when a spawned child process (vLLM's engine, say) re-imports this module
    main()
