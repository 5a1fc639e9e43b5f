"""Domain errors of `core`: wrong input from a person or a file.

Each carries a one-line message meant for the person; the edges (the Gradio app,
the CLIs) turn them into `gr.Error` or a message and a non-zero exit.
"""


class DermaLoopError(Exception):
    """Base of every error a person can fix."""


class ImageError(DermaLoopError):
    """An upload that is not a usable image (empty, not an image, truncated, too big, too many)."""


class InputError(DermaLoopError):
    """A question, context or setting that cannot be used as given."""


class ModelLoadError(DermaLoopError):
    """A model or adapter that cannot be found or loaded."""


class BackendError(DermaLoopError):
    """A remote serving back-end (an OpenAI-compatible server) that is down, refuses, or answers nonsense."""
