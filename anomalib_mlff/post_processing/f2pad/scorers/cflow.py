"""anomalib's CFLOW: its normalising flows' likelihoods recomputed with the graph to the pixels kept."""

from __future__ import annotations

import torch
from anomalib.models.image.cflow.torch_model import CflowModel
from anomalib.models.image.cflow.utils import get_logp, positional_encoding_2d
from torch.nn import functional as F  # noqa: N812

from .anomaly_map import AnomalyMapScorer
from .registry import register_scorer


@register_scorer(CflowModel)
class CflowScorer(AnomalyMapScorer):
    """anomalib's ``CflowModel``: each layer's negative log-likelihood per feature dimension, summed over layers.

    CFLOW's forward runs its encoder and decoders under ``torch.no_grad`` and turns the likelihoods into a map
    with batch-wide normalisation, so it cannot be differentiated as it is. This scorer computes the same
    likelihoods (encoder features, positional condition, normalising-flow decoder, ``get_logp``) with the graph
    kept, resizes each layer's map to the image bilinearly as CFLOW does, and sums them. Whole images.
    """

    def _anomaly_map(self, normalised: torch.Tensor) -> torch.Tensor:
        features = self.model.encoder(normalised)
        maps = []
        for layer, decoder in zip(self.model.pool_layers, self.model.decoders, strict=True):
            activation = features[layer]
            batch, channels, height, width = activation.shape
            condition = positional_encoding_2d(self.model.condition_vector, height, width).to(activation)
            condition = condition.permute(1, 2, 0).reshape(1, height * width, -1).expand(batch, -1, -1)
            embedding = activation.permute(0, 2, 3, 1).reshape(-1, channels)
            latent, log_jacobian = decoder(embedding, [condition.reshape(batch * height * width, -1)])
            negative_log_likelihood = -get_logp(channels, latent, log_jacobian) / channels
            layer_map = negative_log_likelihood.reshape(batch, 1, height, width)
            maps.append(F.interpolate(layer_map, size=normalised.shape[-2:], mode="bilinear", align_corners=True))
        return torch.stack(maps).sum(0)
