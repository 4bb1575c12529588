"""The lowest layer, with the deliberate upward import the contract must catch."""

from fixturepkg.tasks import classify  # noqa: F401  (model -> tasks: forbidden)
