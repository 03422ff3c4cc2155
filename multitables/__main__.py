"""Run the multitables command line: ``python -m multitables {info,bench,tune}``."""

from multitables._tools.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
