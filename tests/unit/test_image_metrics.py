"""FID, KID and CLIP score: torchmetrics' numbers against the formulas computed directly, the split
of an evaluation across ranks, the reference-feature cache, and the feature extractors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from data_pipelines.raw.sources.digits import DIGIT_WORDS
from lf_common.errors import DataError
from tests.tiny_clip import digit_images
from trainer.evaluation import distributed
from trainer.evaluation.clip_score import clip_score_metric, load_clip
from trainer.evaluation.digits_features import DigitsFeatures
from trainer.evaluation.distance import frechet_distance, kernel_distance
from trainer.evaluation.distributed import RankShare, gather_rows
from trainer.evaluation.features import FeatureExtractor, images_to_tensor
from trainer.evaluation.inception import FIDInceptionV3, InceptionFeatures
from trainer.evaluation.reference import ImageFolderReference, reference_features


def scipy_fid(real: np.ndarray, generated: np.ndarray) -> float:
    """Heusel et al. 2017: |mu_r - mu_g|^2 + Tr(S_r + S_g - 2 sqrtm(S_r S_g))."""
    mu_r, mu_g = real.mean(0), generated.mean(0)
    s_r, s_g = np.cov(real, rowvar=False), np.cov(generated, rowvar=False)
    return float(((mu_r - mu_g) ** 2).sum() + np.trace(s_r + s_g - 2 * scipy.linalg.sqrtm(s_r @ s_g).real))


def numpy_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased squared MMD with KID's kernel (x.y / D + 1)^3 (Bińkowski et al. 2018), equal sizes."""
    kernel = lambda a, b: (a @ b.T / x.shape[1] + 1) ** 3  # noqa: E731
    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    m = len(x)
    return float(
        (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1)) - 2 * k_xy.mean()
    )


@pytest.fixture(scope="module")
def two_sets() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(120, 12)), rng.normal(0.3, 1.3, size=(90, 12))


def test_fid_of_a_set_with_itself_is_zero(two_sets):
    real = torch.from_numpy(two_sets[0])
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-8)


def test_fid_equals_the_formula_computed_with_scipy(two_sets):
    real, generated = two_sets
    fid = frechet_distance(torch.from_numpy(real), torch.from_numpy(generated))
    assert fid == pytest.approx(scipy_fid(real, generated), rel=1e-9)
    assert fid > 1.0


def test_kid_equals_the_unbiased_mmd_on_the_same_subsets(two_sets):
    real, generated = two_sets
    mean, std = kernel_distance(torch.from_numpy(real), torch.from_numpy(generated), subsets=5, subset_size=50, seed=3)
    torch.manual_seed(3)  # the subsets torchmetrics draws: a permutation of each set per subset
    values = []
    for _ in range(5):
        real_rows, generated_rows = torch.randperm(len(real))[:50].numpy(), torch.randperm(len(generated))[:50].numpy()
        values.append(numpy_mmd(real[real_rows], generated[generated_rows]))
    assert mean == pytest.approx(np.mean(values), rel=1e-9)
    assert std == pytest.approx(np.std(values), rel=1e-6)


def test_kid_of_whole_equal_sets_is_one_exact_value_and_repeats(two_sets):
    real, generated = torch.from_numpy(two_sets[0][:90]), torch.from_numpy(two_sets[1])
    mean, std = kernel_distance(real, generated, subsets=3, subset_size=1000)
    assert mean == pytest.approx(numpy_mmd(two_sets[0][:90], two_sets[1]), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-12)
    state = torch.get_rng_state()
    assert kernel_distance(real, generated, subsets=4, subset_size=40) == kernel_distance(
        real, generated, subsets=4, subset_size=40
    )
    assert torch.equal(torch.get_rng_state(), state), "the global RNG is left as it was"


def test_three_ranks_shares_cover_every_item_once_and_gather_in_item_order(monkeypatch):
    total, world = 8, 3
    shares = [RankShare(total, rank, world) for rank in range(world)]
    assert [s.slots for s in shares] == [3, 3, 3]
    real_items = sorted(i for s in shares for i, valid in zip(s.indices, s.valid, strict=True) if valid)
    assert real_items == list(range(total))
    rows = [torch.tensor([[float(i)] for i in s.indices]) for s in shares]  # each rank's rows: its items' numbers
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, world))
    monkeypatch.setattr(
        distributed.dist, "all_gather", lambda out, local: [o.copy_(r) for o, r in zip(out, rows, strict=True)]
    )
    gathered = gather_rows(rows[0], total)
    assert gathered[:, 0].tolist() == [float(i) for i in range(total)]


class ColourStatistics(FeatureExtractor):
    """Per-channel mean and standard deviation (6 features); counts the images it sees."""

    num_features = 6

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale
        self.seen = 0

    def settings(self):
        return {"scale": self.scale}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen += len(images)
        x = images.double() * self.scale
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_reference_features_are_cached_reused_and_invalidated(tmp_path):
    folder, cache = tmp_path / "reference", tmp_path / "cache"
    folder.mkdir()
    images, _ = digit_images("heldout", 6)
    for i, image in enumerate(images):
        image.save(folder / f"{i}.png")
    extractor = ColourStatistics()

    first = reference_features(ImageFolderReference(folder), extractor, (32, 32), cache)
    assert not first.cached and first.path.is_file() and first.features.shape == (6, 6)
    assert extractor.seen == 6
    again = reference_features(ImageFolderReference(folder), extractor, (32, 32), cache)
    assert again.cached and again.path == first.path and extractor.seen == 6, "read from the cache, nothing extracted"
    assert torch.equal(again.features, first.features)

    images[0].point(lambda value: 255 - value).save(folder / "0.png")  # one reference image changes
    changed = reference_features(ImageFolderReference(folder), extractor, (32, 32), cache)
    assert not changed.cached and changed.path != first.path and extractor.seen == 12
    assert not torch.equal(changed.features, first.features)
    other = reference_features(ImageFolderReference(folder), ColourStatistics(scale=2.0), (32, 32), cache)
    assert not other.cached, "another extractor (its fingerprint) is another entry"
    resized = reference_features(ImageFolderReference(folder), extractor, (16, 16), cache)
    assert not resized.cached and extractor.seen == 18, "another image size is another entry"
    assert len(list(cache.glob("*.safetensors"))) == 4


def test_inception_loads_the_weights_file_strictly_and_gives_2048_features(tmp_path):
    torch.manual_seed(0)
    state = {k: v for k, v in FIDInceptionV3().state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)  # the file's layout: torchvision Inception3 names, no BN counters
    extractor = InceptionFeatures(path)
    features = extractor(images_to_tensor(digit_images("heldout", 1)[0]))
    assert features.shape == (1, 2048) and torch.isfinite(features).all()

    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(DataError, match=r"broken\.pth: .*missing keys \['Mixed_7c\.branch_pool\.conv\.weight'\]"):
        InceptionFeatures(tmp_path / "broken.pth")
    torch.save({"weights": Image.new("RGB", (2, 2))}, tmp_path / "pickle.pth")
    with pytest.raises(DataError, match=r"pickle\.pth: not a PyTorch weights file loadable with weights_only=True"):
        InceptionFeatures(tmp_path / "pickle.pth")
    with pytest.raises(DataError, match=r"does not exist; download pt_inception-2015-12-05-6726825d\.pth"):
        InceptionFeatures(tmp_path / "missing.pth")


def test_digits_features_put_real_digits_far_from_a_collapsed_generator():
    extractor = DigitsFeatures(size=32)
    real, _ = digit_images("heldout", 150)
    train, labels = digit_images("train", 300)
    collapsed = [image for image, label in zip(train, labels, strict=True) if label in (1, 7)]  # two digits only
    sets = {"real": real, "train": train[:150], "collapsed": collapsed}
    features = {name: extractor(images_to_tensor(images)) for name, images in sets.items()}
    assert features["real"].shape == (150, 45)
    to_train = frechet_distance(features["real"], features["train"])
    assert to_train < frechet_distance(features["real"], features["collapsed"]) / 3


def test_clip_score_orders_matching_prompts_above_mismatched_ones(tiny_clip_dir):
    metric = clip_score_metric(tiny_clip_dir)
    images, labels = digit_images("heldout", 60)
    pixels = images_to_tensor(images)
    metric.update(pixels, [f"a handwritten digit {DIGIT_WORDS[label]}" for label in labels])
    matching = float(metric.compute())
    metric.reset()
    metric.update(pixels, [f"a handwritten digit {DIGIT_WORDS[(label + 3) % 10]}" for label in labels])
    mismatched = float(metric.compute())
    assert matching > mismatched + 5.0, (matching, mismatched)


def test_clip_folder_whose_weights_miss_a_key_is_refused(tiny_clip_dir, tmp_path):
    import shutil

    broken = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["visual_projection.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        DataError, match=r"clip: the weights do not match the CLIP config: missing_keys \['visual_projection"
    ):
        load_clip(broken)
