"""`python -m training.refine`: the refine command (training/refine/run.py says what it does)."""

import sys

from training.refine.run import main

sys.exit(main())
