"""hdlib.downstream: classifier building / weight loading, augmentation, training
with validation-only model selection, inference helpers."""

import pytest
import torch

from hdlib.downstream import (
    HistologyAugment,
    build_classifier,
    evaluate,
    extract_features,
    predict,
    train_classifier,
)
from hdlib.errors import DataError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def colour_classes(n, seed, size=16):
    """Two classes that differ only in colour (pinkish vs bluish), with pixel noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    base = torch.where(y.view(-1, 1, 1, 1) == 0, torch.tensor([170, 60, 90]).view(1, 3, 1, 1),
                       torch.tensor([90, 60, 170]).view(1, 3, 1, 1))
    x = (base + torch.randint(-50, 51, (n, 3, size, size), generator=g)).clamp(0, 255).to(torch.uint8)
    return x, y.long()


def rand_images(n, size, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


# --- build_classifier -------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "resnet10t"])
def test_build_classifier_logits_shape_at_64px(name):
    model = build_classifier(name, num_classes=9).eval()
    x = rand_images(2, 64)
    with torch.no_grad():
        out = model(x)
        # the wrapper normalises itself: uint8 (0-255) and float (0-1) images are the same input
        torch.testing.assert_close(model(x.float() / 255), out)
    assert out.shape == (2, 9) and model.num_classes == 9
    assert torch.isfinite(out).all()


def test_build_classifier_seeded_init_and_rng_untouched():
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    a = build_classifier("resnet10t", num_classes=2, seed=1)
    assert torch.equal(torch.rand(1), expected)
    b = build_classifier("resnet10t", num_classes=2, seed=1)
    c = build_classifier("resnet10t", num_classes=2, seed=2)
    wa, wb, wc = (m.net.conv1[0].weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_vit_at_other_image_size():
    model = build_classifier("vit_tiny_patch16_224", num_classes=3, img_size=32).eval()
    with torch.no_grad():
        assert model(rand_images(2, 32)).shape == (2, 3)
        assert extract_features(model, rand_images(2, 32)).shape == (2, model.num_features)


def test_local_weights_round_trip_and_head_replacement(tmp_path):
    src = build_classifier("resnet10t", num_classes=9, seed=3)
    path = tmp_path / "backbone.pt"
    torch.save(src.net.state_dict(), path)

    same = build_classifier("resnet10t", num_classes=9, pretrained_weights=str(path), seed=4).eval()
    x = rand_images(3, 32)
    with torch.no_grad():
        assert torch.equal(same(x), src.eval()(x))

    # Another number of classes: backbone loaded, head freshly initialised.
    other = build_classifier("resnet10t", num_classes=2, pretrained_weights=path, seed=4)
    assert torch.equal(other.net.conv1[0].weight, src.net.conv1[0].weight)
    assert other.net.fc.weight.shape == (2, src.num_features)

    # The wrapper's own state dict (keys prefixed 'net.') is accepted too.
    torch.save(src.state_dict(), tmp_path / "wrapped.pt")
    wrapped = build_classifier("resnet10t", num_classes=9, pretrained_weights=tmp_path / "wrapped.pt")
    assert torch.equal(wrapped.net.fc.weight, src.net.fc.weight)


def test_vit_weights_load_at_another_image_size(tmp_path):
    src = build_classifier("vit_tiny_patch16_224", num_classes=3, img_size=32)
    torch.save(src.net.state_dict(), tmp_path / "vit.pt")
    dst = build_classifier("vit_tiny_patch16_224", num_classes=3, img_size=48, pretrained_weights=tmp_path / "vit.pt")
    assert torch.equal(dst.net.blocks[0].attn.qkv.weight, src.net.blocks[0].attn.qkv.weight)
    assert dst.net.pos_embed.shape[1] == 1 + 9  # 3x3 patches + CLS token, resampled from 2x2


def test_bad_weights_files_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="missing.pt.*not found"):
        build_classifier("resnet10t", num_classes=2, pretrained_weights=tmp_path / "missing.pt")
    torch.save(build_classifier("resnet18", num_classes=2).net.state_dict(), tmp_path / "r18.pt")
    with pytest.raises(DataError, match="r18.pt.*do not fit"):
        build_classifier("resnet10t", num_classes=2, pretrained_weights=tmp_path / "r18.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(DataError, match="junk.pt: cannot read") as err:
        build_classifier("resnet10t", num_classes=2, pretrained_weights=tmp_path / "junk.pt")
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="unknown timm model"):
        build_classifier("no_such_net", num_classes=2)


# --- augmentation -----------------------------------------------------------

def test_augment_deterministic_shape_dtype():
    aug = HistologyAugment()
    x = rand_images(16, 24, seed=1)
    a = aug(x, generator=torch.Generator().manual_seed(7))
    b = aug(x, generator=torch.Generator().manual_seed(7))
    c = aug(x, generator=torch.Generator().manual_seed(8))
    assert a.shape == x.shape and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, x)
    xf = x.float() / 255
    af = aug(xf, generator=torch.Generator().manual_seed(7))
    assert af.dtype == torch.float32 and 0 <= af.min() and af.max() <= 1
    assert (af * 255 - a.float()).abs().max() <= 1.0  # same transform on float and uint8 input


def test_geometric_augment_only_moves_pixels():
    aug = HistologyAugment(brightness=0, contrast=0, saturation=0, hue=0)
    constant = torch.full((8, 3, 16, 16), 123, dtype=torch.uint8)
    assert torch.equal(aug(constant, generator=torch.Generator().manual_seed(0)), constant)
    x = rand_images(32, 8, seed=2)
    y = aug(x, generator=torch.Generator().manual_seed(1))
    # Each output is a flip/rotation of its input: same pixel values, one of the 8 symmetries.
    assert torch.equal(y.flatten(1).sort(dim=1).values, x.flatten(1).sort(dim=1).values)
    symmetries = [torch.rot90(t, k, dims=(-2, -1)) for t in (x, x.flip(-1)) for k in range(4)]
    matched = torch.stack([(y == s).flatten(1).all(1) for s in symmetries])
    assert matched.any(0).all()
    assert (matched.sum(1) > 0).sum() >= 6  # most symmetries occur in a batch of 32


def test_colour_jitter_is_small_and_keeps_grey_grey():
    aug = HistologyAugment(flips=False, rotations=False, brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02)
    x = rand_images(16, 8, seed=3)
    y = aug(x, generator=torch.Generator().manual_seed(0))
    assert (y.float() - x.float()).abs().mean() < 25
    grey = torch.full((4, 3, 8, 8), 100, dtype=torch.uint8)
    g = aug(grey, generator=torch.Generator().manual_seed(0)).float()
    assert (g.max(dim=1).values - g.min(dim=1).values).max() <= 1  # still grey, only brighter/darker


# --- training ---------------------------------------------------------------

@pytest.fixture(scope="module")
def colour_data():
    return colour_classes(64, 0), colour_classes(32, 1)


def _train(data, seed, **kw):
    (x, y), (vx, vy) = data
    args = dict(backbone="resnet10t", num_classes=2, max_steps=30, batch_size=16, lr=2e-3, eval_every=5,
                seed=seed, progress=False)
    args.update(kw)
    return train_classifier(x, y, vx, vy, **args)


def test_train_classifier_learns_and_is_deterministic(colour_data):
    (x, y), (vx, vy) = colour_data
    m1, h1 = _train(colour_data, seed=0)
    m2, h2 = _train(colour_data, seed=0)
    m3, h3 = _train(colour_data, seed=1)
    assert evaluate(m1, vx, vy, num_classes=2)["accuracy"] >= 0.8  # chance is 0.5
    assert list(h1["step"]) == [5, 10, 15, 20, 25, 30]
    assert h1.equals(h2)
    for p1, p2 in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(p1, p2)
    assert not h1["train_loss"].equals(h3["train_loss"])
    assert h1["lr"].iloc[0] > h1["lr"].iloc[-1]  # cosine decay


def test_train_classifier_honours_every_training_setting(colour_data, tmp_path):
    """One trainer for every model: micro-batches (gradient accumulation: BatchNorm then sees
    smaller batches, so the weights move), EMA and gradient clipping all change the result;
    bf16 runs; checkpoints land in out_dir."""
    w = lambda m: torch.cat([p.flatten() for p in m.parameters()])  # noqa: E731
    base, _ = _train(colour_data, seed=0, max_steps=6)
    variants = [_train(colour_data, seed=0, max_steps=6, **kw)[0]
                for kw in ({"micro_batch_size": 4}, {"ema_decay": 0.9}, {"grad_clip": 1e-3})]
    for m in variants:
        assert not torch.allclose(w(base), w(m))
    again, _ = _train(colour_data, seed=0, max_steps=6, micro_batch_size=4)
    assert torch.equal(w(again), w(variants[0]))
    _train(colour_data, seed=0, max_steps=4, mixed_precision="bf16", out_dir=tmp_path / "run",
           checkpointing_steps=2)
    assert (tmp_path / "run" / "final" / "best" / "selection.json").exists()
    assert list((tmp_path / "run" / "checkpoints").glob("step-*"))


def test_synthetic_images_never_reduce_real_exposure():
    """Batches: `batch_size` real images (class-balanced) + synthetic_per_real x batch_size
    synthetic ones, so every setting sees the real images equally often."""
    from hdlib.batching import GroupPlan

    real_y = torch.tensor([0] * 30 + [1] * 6)
    syn_y = torch.tensor([0] * 4 + [1] * 40)
    only = GroupPlan(0, [(torch.arange(36), real_y, 12)])
    mixed = GroupPlan(0, [(torch.arange(36), real_y, 12), (torch.arange(36, 80), syn_y, 24)])
    for plan in (only, mixed):
        seen = torch.cat([plan(s)[0] for s in range(20)])
        real = seen[seen < 36]
        assert len(real) == 20 * 12
        assert torch.bincount(real_y[real]).tolist() == [120, 120]  # class-balanced
        counts = torch.bincount(real, minlength=36)
        assert counts[:30].max() - counts[:30].min() <= 1 and counts[30:].max() - counts[30:].min() <= 1
    syn = torch.cat([mixed(s)[0] for s in range(20)])
    assert torch.bincount(syn_y[syn[syn >= 36] - 36]).tolist() == [240, 240]


def test_model_selection_on_validation(colour_data):
    (x, y), (vx, vy) = colour_data
    # Large lr + label noise make the validation score move between evaluations.
    noisy = y.clone()
    noisy[::3] = 1 - noisy[::3]
    model, hist = train_classifier(x, noisy, vx, vy, backbone="resnet10t", num_classes=2, max_steps=24,
                                   batch_size=16, lr=2e-2, eval_every=3, seed=2, progress=False, balanced=True)
    assert hist["val_balanced_accuracy"].nunique() > 1  # selection had a real choice to make
    assert hist["selected"].sum() == 1
    chosen = hist[hist["selected"]].iloc[0]
    assert chosen["val_balanced_accuracy"] == hist["val_balanced_accuracy"].max()
    ties = hist[hist["val_balanced_accuracy"] == hist["val_balanced_accuracy"].max()]
    assert chosen["val_loss"] == ties["val_loss"].min()
    val = evaluate(model, vx, vy, num_classes=2)
    assert val["balanced_accuracy"] == pytest.approx(chosen["val_balanced_accuracy"])
    assert val["loss"] == pytest.approx(chosen["val_loss"], rel=1e-5)
    assert not model.training


def test_train_classifier_rejects_bad_input_early(colour_data):
    (x, y), (vx, vy) = colour_data
    with pytest.raises(DataError, match="training set.*uint8"):
        train_classifier(x.float(), y, vx, vy, num_classes=2, max_steps=1, progress=False)
    with pytest.raises(DataError, match="validation set.*labels outside"):
        train_classifier(x, y, vx, vy + 5, num_classes=2, max_steps=1, progress=False)
    with pytest.raises(DataError, match="64 images but 63 labels"):
        train_classifier(x, y[:-1], vx, vy, num_classes=2, max_steps=1, progress=False)
    with pytest.raises(ValueError, match="exactly one of epochs or max_steps"):
        train_classifier(x, y, vx, vy, num_classes=2, progress=False)


# --- inference --------------------------------------------------------------

def test_predict_features_evaluate_consistent():
    model = build_classifier("resnet10t", num_classes=3, seed=0)
    x = rand_images(10, 16, seed=4)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    probs, preds = predict(model, x, batch_size=4)
    assert probs.shape == (10, 3) and preds.dtype == torch.int64
    assert torch.allclose(probs.sum(1), torch.ones(10), atol=1e-5)
    assert torch.equal(preds, probs.argmax(1))
    probs_big_batch, _ = predict(model, x, batch_size=10)
    assert torch.allclose(probs, probs_big_batch, atol=1e-5)  # eval mode: batch-independent
    feats = extract_features(model, x, batch_size=3)
    assert feats.shape == (10, model.num_features)
    with torch.no_grad():
        logits = model.net.get_classifier()(feats)
    assert torch.allclose(logits.softmax(1), probs, atol=1e-5)  # features are the head's input
    m = evaluate(model, x, y, num_classes=3, class_names=["a", "b", "c"])
    assert m["accuracy"] == pytest.approx((preds == y).float().mean().item())
    assert set(m["sensitivity"]) == {"a", "b", "c"}
