"""Image-to-video training details the pipelines imply: image-condition dropout as the release trained."""

from __future__ import annotations

import pytest
import torch
import yaml
from cogtune.train.math import RELEASE_IMAGE_DROPOUT, drop_images
from train_helpers import cogtrain, losses


def test_image_dropout_zeroes_whole_image_latents_per_sample_with_its_probability():
    latents = torch.randn(4000, 2, 1, 3, 3) + 5.0  # no sample is zero by chance
    dropped = drop_images(latents, 0.25, torch.Generator().manual_seed(0))
    zeroed = (dropped == 0).flatten(1).all(1)
    kept = (dropped == latents).flatten(1).all(1)
    assert bool((zeroed | kept).all())  # a whole latent or nothing
    assert abs(zeroed.float().mean().item() - 0.25) < 0.03
    # drawn from the step's generator: the same generator state drops the same samples (resume stays exact)
    assert torch.equal(drop_images(latents, 0.25, torch.Generator().manual_seed(0)), dropped)
    assert torch.equal(drop_images(latents, 0.0, torch.Generator().manual_seed(0)), latents)


@pytest.fixture
def i2v_store(i2v_train_store):
    return i2v_train_store


def test_an_i2v_run_drops_the_image_as_the_release_did_unless_told(i2v_store, tiny_models, tmp_path):
    run = tmp_path / "run"
    cogtrain(i2v_store, tiny_models["1.5-5b-i2v"], run, "--max-steps", "1")
    assert yaml.safe_load((run / "config.yaml").read_text())["image_dropout"] == RELEASE_IMAGE_DROPOUT == 0.05
    assert "| image_dropout | 0.05 |" in (run / "README.md").read_text()  # the model card says so

    other = tmp_path / "other"
    cogtrain(i2v_store, tiny_models["1.5-5b-i2v"], other, "--max-steps", "1", "--image-dropout", "0.5")
    assert yaml.safe_load((other / "config.yaml").read_text())["image_dropout"] == 0.5
    assert sorted(losses(other)) == [1]


def test_image_dropout_is_refused_for_a_text_to_video_model(train_store, tiny_models, tmp_path):
    run = tmp_path / "run"
    result = cogtrain(train_store, tiny_models["5b"], run, "--max-steps", "1", "--image-dropout", "0.1", expect=2)
    assert result.stderr.strip() == ("error: --image-dropout 0.1: CogVideoX-5b is a text-to-video model, it has no "
                                     "image condition to drop")
    assert not run.exists()


def test_validation_images_reach_the_pipeline_as_cogprep_crops_a_training_frame(tiny_models, tmp_path):
    """A portrait image for a landscape validation size: the pipeline receives the pixels cogprep would cache for
    a clip starting with that image (cover, then centre crop), not the image stretched by its VideoProcessor."""
    import numpy as np
    from cogtune.preprocess.frames import resize_to_bucket
    from cogtune.train.validation import validation_images
    from diffusers import CogVideoXImageToVideoPipeline
    from PIL import Image

    image = (np.random.default_rng(0).random((60, 40, 3)) * 255).astype(np.uint8)  # 60 high, 40 wide
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(tiny_models["1.5-5b-i2v"])
    height, width = 48, 80

    def as_pipeline_takes_it(pil) -> torch.Tensor:  # what __call__ does with `image` first
        return pipe.video_processor.preprocess(pil, height=height, width=width)[0]

    [prepared] = validation_images({"validation_image_0": torch.from_numpy(image)}, 1, tmp_path, height, width, "crop")
    trained_on = torch.from_numpy(resize_to_bucket(image[None], height, width, "crop")[0]).permute(2, 0, 1)
    assert torch.allclose(as_pipeline_takes_it(prepared), trained_on.float() / 127.5 - 1, atol=1e-6)
    stretched = as_pipeline_takes_it(Image.fromarray(image))  # what it got before: the same image, other pixels
    assert (stretched - (trained_on.float() / 127.5 - 1)).abs().mean() > 0.1
