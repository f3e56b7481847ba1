"""FID features for the digits demo that need no download: the digits classifier's decision values.

The classifier (:class:`~trainer.evaluation.digits_accuracy.DigitsClassifier`) is trained on the
real training digits in seconds; its 45 one-vs-one decision values describe how an image reads as
each digit against each other, the way Inception's pool features describe photos. FID with them
compares generated and real digits on the real digits' own terms, so the metric path runs end to
end on real data, offline. It is not comparable to Inception FID.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.evaluation.digits_accuracy import DigitsClassifier
from trainer.evaluation.features import FeatureExtractor, tensor_to_images, tensors_fingerprint


class DigitsFeatures(FeatureExtractor):
    """uint8 images ``(B, 3, H, W)`` -> the digits classifier's decision values ``(B, 45)``.

    Args:
        size: the image size the classifier is trained for (the demo's 32).
    """

    num_features = 45

    def __init__(self, size: int = 32) -> None:
        super().__init__()
        self.size = size
        self.classifier = DigitsClassifier(size=size)

    def settings(self) -> dict[str, Any]:
        return {"size": self.size, "svc": self.classifier.model.get_params()}

    def fingerprint(self) -> str:
        model = self.classifier.model
        names = ("support_vectors_", "dual_coef_", "intercept_")
        fitted = {name: torch.from_numpy(getattr(model, name)) for name in names}
        return tensors_fingerprint(type(self).__name__, fitted, self.settings())

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` -> ``(B, 45)`` float64 (on the input's device)."""
        values = self.classifier.features(tensor_to_images(images))  # (B, 45)
        return torch.from_numpy(values).to(images.device)
