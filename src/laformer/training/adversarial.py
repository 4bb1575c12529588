"""FGM adversarial training (Miyato et al., 2017): a second loss on input embeddings nudged uphill.

The perturbation ``r = epsilon * g / ||g||`` uses each example's own gradient norm, and is added to
freshly computed embeddings so a trainable embedding table still receives both passes' gradients.
"""

from __future__ import annotations

import torch


def fgm_perturbation(embeds_grad: torch.Tensor, epsilon: float) -> torch.Tensor:
    """(B, T, H) perturbation of L2 norm ``epsilon`` per example along the loss gradient."""
    norm = embeds_grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (embeds_grad.ndim - 1)))
    return (epsilon * embeds_grad / norm).detach()
