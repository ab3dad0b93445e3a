"""BatchLoader: epoch coverage, determinism, resumption, normalisation, augmentation and flattening."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eqprop.data import ArrayDataset, BatchLoader, load_dataset
from eqprop.data.loader import crop_and_flip

CPU = torch.device("cpu")
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
N, C, H, W = 53, 3, 6, 7  # odd sizes: a last partial batch, and H != W to catch axis mix-ups
Batches = list[tuple[torch.Tensor, torch.Tensor]]


@pytest.fixture
def data() -> ArrayDataset:
    """Random images whose label is their own index, so every batch says which examples it holds."""
    source = torch.Generator().manual_seed(1234)
    images = torch.randint(0, 256, (N, C, H, W), generator=source, dtype=torch.uint8)
    return ArrayDataset(x=images, y=torch.arange(N), num_classes=N, name="synthetic")


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def epoch(loader: BatchLoader) -> Batches:
    return [(x.cpu(), y.cpu()) for x, y in loader]


def same_batches(first: Batches, second: Batches) -> bool:
    return len(first) == len(second) and all(
        x1.equal(x2) and y1.equal(y2) for (x1, y1), (x2, y2) in zip(first, second)
    )


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_shuffled_epoch_covers_every_example_once(data: ArrayDataset, device: torch.device) -> None:
    loader = BatchLoader(data, 10, shuffle=True, device=device, generator=seeded())
    assert len(loader) == 6
    batches = list(loader)
    assert [y.shape[0] for _, y in batches] == [10, 10, 10, 10, 10, 3]
    for x, y in batches:
        assert x.device.type == device.type and y.device.type == device.type
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.equal(data.x[y.cpu()].to(device).float() / 255)
    order = torch.cat([y for _, y in batches]).cpu()
    assert sorted(order.tolist()) == list(range(N))
    assert not order.equal(torch.arange(N))


def test_epochs_get_fresh_orders(data: ArrayDataset) -> None:
    loader = BatchLoader(data, 10, shuffle=True, device=CPU, generator=seeded())
    first, second = (torch.cat([y for _, y in loader]) for _ in range(2))
    assert sorted(second.tolist()) == list(range(N))
    assert not first.equal(second)


def test_unshuffled_order_is_the_dataset_order(data: ArrayDataset) -> None:
    loader = BatchLoader(data, 20, shuffle=False, device=CPU)
    assert torch.cat([y for _, y in loader]).equal(torch.arange(N))


def test_drop_last_skips_the_partial_batch(data: ArrayDataset) -> None:
    loader = BatchLoader(data, 10, shuffle=True, device=CPU, generator=seeded(), drop_last=True)
    assert len(loader) == 5
    labels = torch.cat([y for _, y in loader])
    assert labels.shape == (50,) and labels.unique().shape == (50,)


@pytest.mark.parametrize("augment", [False, True])
def test_same_seed_gives_same_batches(data: ArrayDataset, augment: bool) -> None:
    def run(seed: int) -> Batches:
        loader = BatchLoader(data, 8, shuffle=True, device=CPU, generator=seeded(seed), augment=augment)
        return epoch(loader) + epoch(loader)

    assert same_batches(run(7), run(7))
    assert not same_batches(run(7), run(8))


def test_restoring_the_generator_state_reproduces_the_remaining_batches(data: ArrayDataset) -> None:
    generator = seeded(3)
    loader = BatchLoader(data, 8, shuffle=True, device=CPU, generator=generator, augment=True, crop_padding=2)
    epoch(loader)
    saved = generator.get_state()
    expected = epoch(loader) + epoch(loader)

    resumed_generator = torch.Generator()
    resumed_generator.set_state(saved)
    resumed = BatchLoader(
        data, 8, shuffle=True, device=CPU, generator=resumed_generator, augment=True, crop_padding=2
    )
    assert same_batches(epoch(resumed) + epoch(resumed), expected)


def test_an_interrupted_epoch_advances_the_generator_like_a_full_one(data: ArrayDataset) -> None:
    full, interrupted = seeded(5), seeded(5)
    epoch(BatchLoader(data, 8, shuffle=True, device=CPU, generator=full, augment=True))
    for _ in BatchLoader(data, 8, shuffle=True, device=CPU, generator=interrupted, augment=True):
        break
    assert full.get_state().equal(interrupted.get_state())


def test_normalisation_is_per_channel(data: ArrayDataset) -> None:
    mean, std = (0.2, 0.5, 0.8), (0.1, 0.25, 0.5)
    loader = BatchLoader(
        data, 16, shuffle=True, device=CPU, generator=seeded(), mean=mean, std=std, dtype=torch.float64
    )
    for x, y in loader:
        assert x.dtype == torch.float64
        channel_mean = torch.tensor(mean, dtype=torch.float64).view(1, C, 1, 1)
        channel_std = torch.tensor(std, dtype=torch.float64).view(1, C, 1, 1)
        expected = (data.x[y].double() / 255 - channel_mean) / channel_std
        assert x.shape == expected.shape
        assert (x - expected).abs().max().item() < 1e-12


def test_normalising_with_the_dataset_statistics_centres_it() -> None:
    demo = load_dataset("mnist-demo", "train", None)
    pixels = demo.x.double() / 255
    mean, std = pixels.mean().item(), pixels.std().item()
    loader = BatchLoader(demo, 512, shuffle=True, device=CPU, generator=seeded(), mean=[mean], std=[std])
    values = torch.cat([x.double().flatten() for x, _ in loader])
    assert values.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert values.std().item() == pytest.approx(1.0, abs=1e-5)


def test_flatten_gives_rows_of_pixels(data: ArrayDataset) -> None:
    flat = BatchLoader(data, 16, shuffle=True, device=CPU, generator=seeded(), flatten=True)
    square = BatchLoader(data, 16, shuffle=True, device=CPU, generator=seeded())
    for (x_flat, y_flat), (x, y) in zip(flat, square):
        assert x_flat.shape == (y.shape[0], C * H * W)
        assert y_flat.equal(y) and x_flat.equal(x.reshape(y.shape[0], -1))


def windows(image: torch.Tensor, padding: int) -> dict[tuple[int, int, bool], torch.Tensor]:
    """Every crop (and its mirror) of the edge-padded image, keyed by (row, column, flipped)."""
    padded = F.pad(image[None], (padding,) * 4, mode="replicate")[0]
    found = {}
    for row in range(2 * padding + 1):
        for column in range(2 * padding + 1):
            window = padded[:, row : row + H, column : column + W]
            found[row, column, False] = window
            found[row, column, True] = window.flip(-1)
    return found


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_augmented_images_are_windows_of_the_padded_image(data: ArrayDataset, device: torch.device) -> None:
    padding = 2
    loader = BatchLoader(
        data, 16, shuffle=False, device=device, generator=seeded(), augment=True, crop_padding=padding
    )
    seen = set()
    for x, y in loader:
        assert x.shape == (y.shape[0], C, H, W)
        for image, label in zip(x.cpu(), y.tolist()):
            original = data.x[label].float() / 255
            matches = [key for key, window in windows(original, padding).items() if window.equal(image)]
            assert len(matches) == 1, f"example {label} is not a single window of its padded image"
            seen.add(matches[0])
    assert {flipped for _, _, flipped in seen} == {False, True}
    assert len({(row, column) for row, column, _ in seen}) > 10


def test_flip_without_padding_is_a_true_mirror(data: ArrayDataset) -> None:
    loader = BatchLoader(
        data, 64, shuffle=False, device=CPU, generator=seeded(), augment=True, crop_padding=0
    )
    x, y = next(iter(loader))
    original = data.x.float() / 255
    mirrored = x.ne(original).flatten(1).any(1)
    assert 0 < mirrored.sum() < N
    assert x[mirrored].equal(original[mirrored].flip(-1))
    assert x[~mirrored].equal(original[~mirrored])


def test_crop_and_flip_matches_a_per_image_reference(data: ArrayDataset) -> None:
    images = data.x[:5].float()
    offsets = torch.tensor([[0, 0], [4, 4], [1, 3], [3, 0], [2, 2]])
    flips = torch.tensor([False, True, True, False, True])
    result = crop_and_flip(images, offsets, flips, padding=2)
    for index in range(5):
        padded = F.pad(images[index : index + 1], (2, 2, 2, 2), mode="replicate")[0]
        row, column = offsets[index].tolist()
        expected = padded[:, row : row + H, column : column + W]
        assert result[index].equal(expected.flip(-1) if flips[index] else expected)


def test_invalid_arguments_are_rejected(data: ArrayDataset) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(data, 0, shuffle=False, device=CPU)
    with pytest.raises(ValueError, match="one per channel"):
        BatchLoader(data, 4, shuffle=False, device=CPU, mean=[0.5], std=[0.5])
    with pytest.raises(ValueError, match="together"):
        BatchLoader(data, 4, shuffle=False, device=CPU, mean=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="floating point"):
        BatchLoader(data, 4, shuffle=False, device=CPU, dtype=torch.int32)
