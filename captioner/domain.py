"""Is an input like the model's training data? A compact summary of its training features.

A captioning model describes what it was trained on; shown anything else, it still answers
fluently, and wrongly. The summary is a Gaussian with a low-rank covariance (probabilistic PCA,
Tipping & Bishop 1999) over the per-frame embeddings (``encoder.frame_embeddings``) of the
training items. An input's distance is its Mahalanobis distance under that Gaussian, per
dimension: along the ``rank`` main directions each by its own variance, and the rest by their
shared residual variance. The threshold is calibrated on held-out items (the validation split):
the distance below which ``quantile`` of them fall. A clip is as far as its farthest frame, so a
clip is in domain only when all its frames are.

The summary lives in the model as buffers (``model.domain``), so it travels inside the
checkpoint's safetensors; a model without one reports "unknown" (None).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from captioner.config import ModelConfig

VARIANCE_FLOOR = 1e-6  # keeps a direction the training data never varied along from dividing by 0


class DomainSummary(nn.Module):
    """Mean (E,), main directions (r, E) with their variances (r,), residual variance, threshold."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim, rank = sum(config.encoder.stage_channels), config.domain_rank
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("directions", torch.zeros(rank, dim))
        self.register_buffer("variances", torch.ones(rank))
        self.register_buffer("residual_variance", torch.ones(()))
        self.register_buffer("threshold", torch.ones(()))

    @torch.no_grad()
    def fit(self, train: np.ndarray, held_out: list[np.ndarray], quantile: float) -> None:
        """Fit on training frames' embeddings (N, E); calibrate on held-out items' frames.

        ``held_out`` holds one (T_i, E) array per item, so that clips are calibrated the way
        they are scored (by their farthest frame).
        """
        data = np.asarray(train, dtype=np.float64)
        rank = len(self.variances)
        if len(data) <= rank or not held_out:
            raise ValueError(
                f"a domain summary of rank {rank} needs more than {rank} training frames and "
                f"some held-out items; got {len(data)} and {len(held_out)}"
            )
        mean = data.mean(0)
        _, singular, directions = np.linalg.svd(data - mean, full_matrices=False)
        variances = singular**2 / (len(data) - 1)
        residual = variances[rank:].sum() / max(1, data.shape[1] - rank)
        self.mean.copy_(torch.from_numpy(mean))
        self.directions.copy_(torch.from_numpy(directions[:rank]))
        self.variances.copy_(torch.from_numpy(np.maximum(variances[:rank], VARIANCE_FLOOR)))
        self.residual_variance.fill_(max(float(residual), VARIANCE_FLOOR))
        self.threshold.fill_(1.0)
        scores = [
            float(self.distance(torch.from_numpy(np.asarray(f)).float()).max()) for f in held_out
        ]
        self.threshold.fill_(float(np.quantile(scores, quantile)))

    def distance(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Embeddings (..., E) -> distances (...), in units of the calibrated threshold."""
        centred = embeddings.float() - self.mean
        along = centred @ self.directions.T  # (..., r)
        main = (along**2 / self.variances).sum(-1)
        rest = (centred**2).sum(-1) - (along**2).sum(-1)  # the part outside the main directions
        squared = main + rest.clamp_min(0) / self.residual_variance
        return (squared / centred.shape[-1]).sqrt() / self.threshold

    def score(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Per-frame embeddings (B, T, E) of padded sequences -> (B,): the farthest real frame.

        At most 1 is in domain: the held-out training items scored below 1 at the calibrated
        quantile.
        """
        distances = self.distance(frames)  # (B, T)
        real = torch.arange(frames.shape[1], device=lengths.device) < lengths.unsqueeze(1)
        return distances.masked_fill(~real, 0.0).amax(1)


def attach_domain(
    model: nn.Module, train: np.ndarray, held_out: list[np.ndarray], rank: int, quantile: float
) -> DomainSummary:
    """Give ``model`` a domain summary fitted on ``train`` frames, calibrated on ``held_out``.

    The rank is capped by what the data can estimate; the config records the one used, so a
    checkpoint rebuilds the summary's buffers.
    """
    model.config.domain_rank = max(1, min(rank, len(train) - 2, train.shape[1] - 1))
    summary = DomainSummary(model.config).to(next(model.parameters()).device)
    summary.fit(train, held_out, quantile)
    model.domain = summary
    return summary
