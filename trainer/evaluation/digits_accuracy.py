"""Conditional accuracy on the digits demo: does a generated "digit seven" read as a seven?

A scikit-learn classifier is trained on the real digits' training split, seen through the same
view the generated images get (upscaled to the demo size, then averaged back to 8x8), and reads
each generated image. Chance is 0.10.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from sklearn.svm import SVC

from data_pipelines.raw.sources.digits import DIGIT_WORDS, digit_to_image, digits_split, image_to_digit


def label_of_prompt(prompt: str) -> int:
    """The digit a demo prompt asks for (``"a handwritten digit seven"`` -> 7)."""
    word = prompt.strip().split()[-1].lower()
    if word not in DIGIT_WORDS:
        raise ValueError(f"prompt {prompt!r} does not end with a digit word {DIGIT_WORDS}")
    return DIGIT_WORDS.index(word)


class DigitsClassifier:
    """An RBF SVM on 8x8 digits, trained on the training split's round trip through ``size`` pixels.

    Its one-vs-one decision values are the demo's image features for FID
    (:class:`~trainer.evaluation.digits_features.DigitsFeatures`).
    """

    def __init__(self, size: int = 32) -> None:
        images, labels, _ = digits_split("train")
        features = np.stack([image_to_digit(digit_to_image(d, size)).ravel() for d in images])
        self.size = size
        self.model = SVC(gamma=0.001, C=10.0, decision_function_shape="ovo").fit(features, labels)

    def predict(self, images: list[Image.Image]) -> np.ndarray:
        """Predicted labels ``(N,)`` of RGB images."""
        return self.model.predict(np.stack([image_to_digit(image).ravel() for image in images]))

    def features(self, images: list[Image.Image]) -> np.ndarray:
        """The 45 one-vs-one decision values ``(N, 45)`` of RGB images (what the classifier sees)."""
        return self.model.decision_function(np.stack([image_to_digit(image).ravel() for image in images]))

    def heldout_accuracy(self) -> float:
        """Accuracy on the real held-out digits (what a perfect generator would score)."""
        images, labels, _ = digits_split("heldout")
        predicted = self.predict([digit_to_image(d, self.size) for d in images])
        return float((predicted == labels).mean())


def conditional_accuracy(classifier: DigitsClassifier, images: list[Image.Image], prompts: list[str]) -> float:
    """Fraction of images classified as the digit their prompt named."""
    wanted = np.array([label_of_prompt(p) for p in prompts])
    return float((classifier.predict(images) == wanted).mean())
