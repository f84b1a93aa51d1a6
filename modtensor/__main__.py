"""`python -m modtensor`: the command line (see `modtensor.cli`)."""

from modtensor.cli import main

if __name__ == "__main__":  # pytest's doctest collection imports this module too
    raise SystemExit(main())
