"""Shared fixtures: one torch thread, and small seeded diffusion models on 4 x 8 x 8 latents."""

import pytest
import torch


# torch's thread count before any test module is imported: the count the smoke study's kernels run with
DEFAULT_TORCH_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def torch_threads_left_alone():
    """Every test starts at torch's default thread count and leaves it there. A count changed at a
    module's import (collection) or left behind by a test holds for every later test and changes its
    float reductions: CI's smoke-study check that `augment --as-study` redraws the study's candidates bit
    for bit ran on one thread against a study made on two, and the filter's distances differed."""
    assert torch.get_num_threads() == DEFAULT_TORCH_THREADS, (
        f"torch's thread count is {torch.get_num_threads()} at the start of this test, not the default "
        f"{DEFAULT_TORCH_THREADS}: something set it at import or in an earlier test/fixture without restoring it")
    yield
    assert torch.get_num_threads() == DEFAULT_TORCH_THREADS, f"the test left torch's thread count at {torch.get_num_threads()}"


@pytest.fixture
def one_torch_thread():
    """Run the test on one intra-op thread (same float reductions as a one-thread
    subprocess), restoring the previous count afterwards. Use it module-wide with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_unet():
    """Builder of a small seeded diffusers UNet2DModel (4 x 8 x 8 latents, one attention
    level, in eval mode); num_class_embeds makes it class-conditional."""
    from diffusers import UNet2DModel

    def build(num_class_embeds=None, seed=0):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                               layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                               up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                               num_class_embeds=num_class_embeds).eval()

    return build


@pytest.fixture
def tiny_classifier():
    """Builder of a small seeded noise-aware latent classifier on 4 x 8 x 8 latents (eval mode)."""
    from hdlib.models.latent_classifier import NoiseAwareLatentClassifier

    def build(num_classes=3, seed=1):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return NoiseAwareLatentClassifier(4, num_classes, 8, width=16, depth=1, channel_mult=(1, 2),
                                              attention_resolutions=(4,), num_heads=2, norm_num_groups=8).eval()

    return build
