"""`python -m tlama_mini train|sample|chat ...` (and `torchrun ... -m tlama_mini train ...`); see cli.py."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
