"""The tutorial CNN and its training loop, on real images."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fedcifar.data import load_full, load_partition, resolve_source
from fedcifar.experiments.centralized import run_centralized
from fedcifar.task import (
    Net,
    Recipe,
    add_proximal_gradient,
    augment,
    evaluate,
    flat_weights,
    initial_model,
    load_flat_weights,
    pick_device,
    scale_pixels,
    train,
)


def test_net_is_the_tutorial_cnn():
    net = Net()
    assert net(torch.zeros(4, 3, 32, 32)).shape == (4, 10)
    # conv(3->6,5) + conv(6->16,5) + fc 400->120->84->10
    assert sum(p.numel() for p in net.parameters()) == 62_006


def test_initial_model_is_seeded():
    a, b, c = initial_model(1), initial_model(1), initial_model(2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_the_model_travels_as_one_vector_and_comes_back_exactly():
    sent, received = initial_model(1), Net()
    flat = flat_weights(sent)
    assert flat.shape == (62_006,) and flat.dtype == "float32"
    load_flat_weights(received, flat)
    assert all(
        torch.equal(x, y) for x, y in zip(sent.state_dict().values(), received.state_dict().values(), strict=True)
    )
    with pytest.raises(ValueError, match="expected 62006 weights in one vector"):
        load_flat_weights(received, flat[:-1])


def test_normalize_matches_the_tutorial_transform():
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8)
    expected = (pixels.float() / 255 - 0.5) / 0.5  # ToTensor + Normalize((0.5,), (0.5,))
    assert torch.allclose(scale_pixels(pixels), expected)


def test_pick_device_falls_back_to_cpu():
    assert pick_device("cpu").type == "cpu"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("cuda").type == expected
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda"):
        pick_device("gpu")


def test_training_learns_and_is_reproducible(mini_dir):
    data = load_full(resolve_source(mini_dir), "train")
    recipe, kwargs = Recipe(epochs=8, batch_size=32, lr=0.05, momentum=0.9), dict(device=torch.device("cpu"), seed=3)
    net = initial_model(0)
    before, _ = evaluate(net, data, torch.device("cpu"))
    result = train(net, data, recipe, **kwargs)
    after, accuracy = evaluate(net, data, torch.device("cpu"))
    assert result.examples == 8 * 500
    assert after < before - 0.2 and accuracy > 0.2  # well above chance on what it trained on
    twin = initial_model(0)
    assert train(twin, data, recipe, **kwargs).loss == result.loss
    assert torch.equal(twin.fc3.weight, net.fc3.weight)


def test_centralized_is_partition_zero_of_one(mini_dir):
    """The baseline trains exactly what a single federated client with 1 partition trains."""
    source = resolve_source(mini_dir)
    assert torch.equal(load_partition(source, "train", 0, 1).labels, load_full(source, "train").labels)
    recipe = Recipe(epochs=1, batch_size=32, lr=0.01, momentum=0.9)
    result = run_centralized(source, recipe, seed=5)
    net = initial_model(5)
    client = train(net, load_partition(source, "train", 0, 1), recipe, device=pick_device("auto"), seed=5)
    assert client.loss == pytest.approx(result.train_loss, rel=1e-6)
    loss, accuracy = evaluate(net, load_full(source, "test"), pick_device("auto"))
    assert (loss, accuracy) == pytest.approx((result.test_loss, result.test_accuracy), rel=1e-6)


def test_centralized_throughput_leaves_out_the_first_epoch(mini_dir):
    """The first epoch pays one-off costs (on a GPU: the CUDA context); the throughput is the rest's."""
    epochs = []
    result = run_centralized(
        resolve_source(mini_dir),
        Recipe(epochs=3, batch_size=64, lr=0.01, momentum=0.9),
        seed=5,
        on_epoch=lambda epoch, loss: epochs.append(epoch),
    )
    assert epochs == [1, 2, 3]  # the caller's callback still sees every epoch
    per_epoch = result.examples // 3
    steady_seconds = 2 * per_epoch / result.steady_images_per_second
    assert 0 < steady_seconds < result.train_seconds


def test_evaluate_matches_plain_forward_and_leaves_the_model_trainable(mini_dir):
    """The ServerApp evaluates, loads the next round's weights into the same model, and so on."""
    data = load_full(resolve_source(mini_dir), "test")
    net, cpu = initial_model(3), torch.device("cpu")
    with torch.no_grad():  # the reference: the plain layout, one batch
        logits = net(data.images.float() / 127.5 - 1.0)
    expected = (F.cross_entropy(logits, data.labels).item(), (logits.argmax(1) == data.labels).float().mean().item())
    assert evaluate(net, data, cpu, batch_size=64) == pytest.approx(expected, rel=1e-5)
    for param in net.parameters():
        assert not param.is_inference() and param.is_contiguous()
    load_flat_weights(net, flat_weights(initial_model(4)))
    before = evaluate(net, data, cpu)
    train(net, data, Recipe(epochs=1, batch_size=64, lr=0.01, momentum=0.9), device=cpu, seed=0)
    assert evaluate(net, data, cpu)[0] < before[0]  # it trained: a loss lower on the data it trained on


@pytest.mark.parametrize("padding", ["zeros", "reflect"])
def test_augment_is_a_random_crop_or_flipped_crop_of_each_image(padding):
    """As torchvision's RandomCrop(32, padding=4, padding_mode=constant|reflect) + RandomHorizontalFlip."""
    images = torch.randn(16, 3, 32, 32)
    out = augment(images, torch.Generator().manual_seed(0), padding)
    assert out.shape == images.shape
    mode = {"zeros": "constant", "reflect": "reflect"}[padding]
    padded = F.pad(images, (4, 4, 4, 4), mode=mode)
    flipped = F.pad(images.flip(3), (4, 4, 4, 4), mode=mode)
    kinds = set()
    for i in range(len(images)):
        windows = {
            (f, y, x)
            for f, src in (("plain", padded), ("flip", flipped))
            for y in range(9)
            for x in range(9)
            if torch.equal(src[i, :, y : y + 32, x : x + 32], out[i])
        }
        assert windows, f"image {i} is not a crop of its padded original"
        kinds |= {w[0] for w in windows}
    assert kinds == {"plain", "flip"}  # both happen over 16 images
    again = augment(images, torch.Generator().manual_seed(0), padding)
    assert torch.equal(out, again)  # reproducible


def test_augmented_training_runs_and_differs(mini_dir):
    data = load_full(resolve_source(mini_dir), "train")
    recipe, kwargs = Recipe(epochs=1, batch_size=64, lr=0.01, momentum=0.9), dict(device=torch.device("cpu"), seed=1)
    plain = train(initial_model(0), data, recipe, **kwargs)
    augmented = train(initial_model(0), data, dataclasses.replace(recipe, augmented=True), **kwargs)
    reflected = train(initial_model(0), data, dataclasses.replace(recipe, augmented=True, padding="reflect"), **kwargs)
    assert augmented.examples == plain.examples == reflected.examples == 500
    assert len({augmented.loss, plain.loss, reflected.loss}) == 3


def test_unnormalised_inputs_are_to_tensor_alone():
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert torch.allclose(scale_pixels(pixels, normalize=False), pixels.float() / 255)  # NIID-Bench: ToTensor


def test_the_proximal_gradient_is_the_gradient_of_the_fedprox_term():
    """(mu/2)*||w - w_global||^2 (the FedProx paper's squared norm) differentiates to mu*(w - w_global)."""
    torch.manual_seed(0)
    net, mu = Net(), 0.3
    anchor = [p.detach().clone() + torch.randn_like(p) for p in net.parameters()]
    params = list(net.parameters())
    for p in params:
        p.grad = torch.randn_like(p)  # what the loss's backward left
    before = [p.grad.clone() for p in params]
    term = mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
    expected = torch.autograd.grad(term, params)
    add_proximal_gradient(params, anchor, mu)
    for p, b, e in zip(params, before, expected, strict=True):
        torch.testing.assert_close(p.grad - b, e)


def test_fedprox_training_stays_closer_to_the_global_model(mini_dir):
    data = load_full(resolve_source(mini_dir), "train")
    start = flat_weights(initial_model(0))

    def drift(**recipe) -> float:
        net = initial_model(0)
        train(net, data, Recipe(epochs=2, batch_size=32, lr=0.05, momentum=0.9, **recipe), device="cpu", seed=1)
        return float(((flat_weights(net) - start) ** 2).sum())

    plain, proximal, decayed = drift(), drift(proximal_mu=1.0), drift(weight_decay=0.01)
    assert proximal < 0.8 * plain  # the term pulls every step towards the global model
    assert decayed != plain  # weight decay reaches the optimiser
