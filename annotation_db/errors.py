"""Domain errors of the annotation store.

Wrong input from a person or a file raises one of these; the app turns it into a
`gr.Error`, the CLI into a one-line message and a non-zero exit. Internal
invariants use `assert`. Every message is one clear line for a person.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the store raises on purpose."""


class InvalidInput(StoreError):
    """A value a person gave is not acceptable (score out of range, empty correction...)."""


class NotFound(StoreError):
    """A turn, user, model version or run that was named does not exist."""


class Conflict(StoreError):
    """The request contradicts the current state (promoting a rejected version...)."""


class LockHeld(StoreError):
    """A named lock (the refine lock) is held by another live process."""
