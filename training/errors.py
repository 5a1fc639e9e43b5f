"""Domain errors of `training`: wrong input from a person or a file.

Each carries a one-line message; the CLIs (`python -m training.synth`,
`python -m training.evaluate`, ...) print it and exit non-zero, never a traceback.
They subclass `core.errors.DermaLoopError`, so an edge can catch one base class.
"""

from core.errors import DermaLoopError


class TrainingError(DermaLoopError):
    """Base of the training package's errors a person can fix."""


class DataError(TrainingError):
    """A dataset file, row or encounter that cannot be used (in `--strict` mode, or a file that cannot be read at all)."""


class SynthError(TrainingError):
    """Synthetic data generation that cannot proceed (bad input, an endpoint that keeps failing)."""


class MetricError(TrainingError):
    """A metric that cannot be computed as asked (unknown name, missing encoder)."""
