import numpy as np
import pytest

from data_pipelines.raw.sources.digits import digit_caption, digit_to_image, digits_split
from trainer.evaluation.digits_accuracy import DigitsClassifier, conditional_accuracy, label_of_prompt


@pytest.fixture(scope="module")
def classifier():
    return DigitsClassifier()


def test_label_of_prompt():
    assert label_of_prompt(digit_caption(7)) == 7
    with pytest.raises(ValueError, match="does not end with a digit word"):
        label_of_prompt("a photo of a cat")


def test_real_heldout_digits_score_high_and_wrong_prompts_score_low(classifier):
    images, labels, _ = digits_split("heldout")
    pictures = [digit_to_image(d, 32) for d in images[:200]]
    right = [digit_caption(int(label)) for label in labels[:200]]
    wrong = [digit_caption((int(label) + 1) % 10) for label in labels[:200]]
    assert conditional_accuracy(classifier, pictures, right) > 0.95
    assert conditional_accuracy(classifier, pictures, wrong) < 0.05
    assert classifier.heldout_accuracy() > 0.95


def test_noise_scores_near_chance(classifier):
    rng = np.random.default_rng(0)
    from PIL import Image

    noise = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(100)]
    prompts = [digit_caption(i % 10) for i in range(100)]
    assert conditional_accuracy(classifier, noise, prompts) < 0.3
