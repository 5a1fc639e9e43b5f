"""`python -m training.evaluate`: the evaluation command, kept at its old name (training/eval/evaluate.py)."""

import sys

from training.eval.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
