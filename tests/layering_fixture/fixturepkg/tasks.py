"""The higher layer: it may import the model."""


def classify() -> None:
    """Stands for a task built on the model."""
