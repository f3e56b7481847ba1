"""The per-step choice among stored variants: one index per sample for a group, seeded by the stream position."""

import pytest
import torch

from data_pipelines.loading.variants import draw_variants, variant_generator
from trainer.diffusion.targets import per_sample_mse


def _batch(size: int = 64, count: int = 4) -> dict[str, torch.Tensor]:
    ids = torch.arange(count).float()[None, :, None, None, None].expand(size, count, 1, 2, 2)  # variant v holds v
    return {
        "latents_variants": ids.clone(),
        "loss_mask_variants": ids[:, :, :1].clone() * 10,
        "text_variants": torch.arange(3).float()[None, :, None, None].expand(size, 3, 5, 8).clone(),
        "other": torch.ones(size),
    }


def test_image_keys_share_one_index_per_sample_and_caption_keys_draw_their_own():
    batch = draw_variants(_batch(), variant_generator(seed=1, rank=0, batches_consumed=5))
    assert set(batch) == {"latents", "loss_mask", "text", "other"}
    image = batch["latents"][:, 0, 0, 0]
    assert torch.equal(batch["loss_mask"][:, 0, 0, 0], image * 10)  # the mask follows its latent's variant
    assert len(set(image.tolist())) > 1 and len(set(batch["text"][:, 0, 0].tolist())) > 1


def test_the_draw_is_a_function_of_seed_rank_and_position_and_covers_the_variants_evenly():
    def drawn(seed: int, rank: int, position: int) -> torch.Tensor:
        return draw_variants(_batch(), variant_generator(seed, rank, position))["latents"][:, 0, 0, 0]

    assert torch.equal(drawn(3, 1, 17), drawn(3, 1, 17))  # a resumed run draws the same
    assert not torch.equal(drawn(3, 1, 17), drawn(3, 1, 18))
    assert not torch.equal(drawn(3, 1, 17), drawn(3, 0, 17))
    counts = torch.bincount(torch.cat([drawn(0, 0, p) for p in range(100)]).long(), minlength=4)
    assert (counts - 1600).abs().max() < 160  # 6400 draws of 4 variants: within 10% of 1600 each


def test_validation_takes_the_first_variant_and_mismatched_counts_are_refused():
    batch = draw_variants(_batch(), None)
    assert batch["latents"].abs().sum() == 0 and batch["text"].abs().sum() == 0
    bad = _batch()
    bad["loss_mask_variants"] = bad["loss_mask_variants"][:, :2]
    with pytest.raises(ValueError, match="variant counts differ"):
        draw_variants(bad, None)


def test_pixel_weights_scale_each_elements_squared_error():
    output, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    weights = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    assert torch.allclose(per_sample_mse(output, target, weights), torch.tensor([1.5 / 4, 1.0]))
