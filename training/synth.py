"""`python -m training.synth`: the synthetic-data command, kept at its old name (training/data/synth.py)."""

import sys

from training.data.synth import main

if __name__ == "__main__":
    sys.exit(main())
