"""``laformer serve``: an OpenAI-compatible HTTP server (chat, completions, embeddings, classification) whose
generation requests share decode steps in a continuously refilled batch. Needs ``pip install "laformer[serve]"``.
"""

from laformer.serve.served import ServedModel
from laformer.serve.server import load_served, run

__all__ = ["ServedModel", "load_served", "run"]
