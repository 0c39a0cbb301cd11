"""Metrics against hand-made maps and models whose scores are known.

Faithfulness metrics run on a toy "model" whose class-0 logit is ``gain * (mean of the image over a
known square region R, all channels) - offset`` and whose class-1 logit is 0, so the softmax
probability of class 0 is ``sigmoid(gain * m - offset)`` and every curve can be written down by
hand. Images are 16x16 with R the central 8x8 square (rows and columns 4..11, 64 of 256 pixels).
Localisation metrics run on hand-made masks; the sanity and head-ablation metrics on a tiny timm ViT.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn
from torch.testing import assert_close

import gmar
from conftest import FACTORIES, make_timm
from gmar.eval import metrics as M
from tolerance import FLOAT32

SIZE = 16
PIXELS = SIZE * SIZE


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def square(top: int, left: int, side: int, size: int = SIZE) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top : top + side, left : left + side] = True
    return mask


REGION = square(4, 4, 8)  # the central 8x8 square: rows/cols 4..11


class RegionModel(nn.Module):
    """Logits ``[gain * m - offset, 0]``, ``m`` the image's mean over ``REGION`` and all channels."""

    def __init__(self, gain: float = 10.0, offset: float = 5.0) -> None:
        super().__init__()
        self.register_buffer("region", REGION.float())
        self.gain, self.offset = gain, offset
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        m = (x * self.region).sum(dim=(1, 2, 3)) / (x.shape[1] * self.region.sum())
        return torch.stack([self.gain * m - self.offset, torch.zeros_like(m)], dim=1)


def region_prob(image: torch.Tensor, gain: float = 10.0, offset: float = 5.0) -> float:
    """The toy model's class-0 probability, in closed form, for one image ``(3, H, W)``."""
    m = float(image.double()[:, REGION].mean())
    return sigmoid(gain * m - offset)


def own_trapezoid(values, fractions) -> float:
    return sum((fractions[i + 1] - fractions[i]) * (values[i] + values[i + 1]) / 2 for i in range(len(values) - 1))


def random_map(seed: int, size: int = SIZE) -> torch.Tensor:
    return torch.rand(size, size, generator=torch.Generator().manual_seed(seed))


PERFECT = REGION.float()
INVERTED = 1.0 - REGION.float()
UNIFORM = torch.full((SIZE, SIZE), 0.5)


# --------------------------------------------------------------------------------------------- Scorer


class FirstRow(nn.Module):
    """Logits are the first three values of the image's first row (channel 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return x[:, 0, 0, :3]


def logit_images(rows: list[list[float]]) -> torch.Tensor:
    images = torch.zeros(len(rows), 3, 4, 4)
    images[:, 0, 0, :3] = torch.tensor(rows)
    return images


def test_scorer_softmax_probability_and_argmax_hit():
    model = FirstRow()
    images = logit_images([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 3.0, -1.0]])
    probability, hit = M.Scorer(model)(images, torch.tensor([0, 1, 1]))
    e = math.exp
    expected = [e(2) / (e(2) + e(1) + 1), e(1) / (e(2) + e(1) + 1), e(3) / (1 + e(3) + e(-1))]
    assert_close(probability, torch.tensor(expected), **FLOAT32)
    assert hit.dtype == torch.bool
    assert hit.tolist() == [True, False, True]


def test_scorer_multi_label_sigmoid_and_positive_logit_hit():
    model = FirstRow()
    images = logit_images([[1.0, -2.0, 0.0]] * 3)
    probability, hit = M.Scorer(model, multi_label=True)(images, torch.tensor([0, 1, 2]))
    assert_close(probability, torch.tensor([sigmoid(1.0), sigmoid(-2.0), 0.5]))
    assert hit.tolist() == [True, False, False]  # logit 0 (probability 0.5) is not "above 0.5"


@pytest.mark.parametrize("multi_label", [False, True])
def test_scorer_chunks_by_batch_size(multi_label):
    images = logit_images(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)).tolist())
    classes = torch.tensor([0, 2, 1, 1, 0])
    whole_model, chunked_model = FirstRow(), FirstRow()
    whole = M.Scorer(whole_model, multi_label=multi_label)(images, classes)
    chunked = M.Scorer(chunked_model, multi_label=multi_label, batch_size=2)(images, classes)
    assert whole_model.calls == [5]
    assert chunked_model.calls == [2, 2, 1]
    assert_close(chunked[0], whole[0])
    assert torch.equal(chunked[1], whole[1])


# ------------------------------------------------------------------------------------------ trapezoid


def test_trapezoid_by_hand():
    fractions = torch.tensor([0.0, 0.1, 0.4])
    values = torch.tensor([[1.0, 3.0, 5.0], [0.0, 0.0, 1.0]])
    # 0.1 * (1 + 3) / 2 + 0.3 * (3 + 5) / 2 = 1.4; 0.3 * 0.5 = 0.15
    assert_close(M.trapezoid(values, fractions), torch.tensor([1.4, 0.15]))


def test_trapezoid_batched_over_leading_dimensions():
    fractions = torch.linspace(0, 1, 5)
    values = torch.rand(2, 3, 5, generator=torch.Generator().manual_seed(0))
    result = M.trapezoid(values, fractions)
    assert result.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert result[i, j].item() == pytest.approx(own_trapezoid(values[i, j].tolist(), fractions.tolist()))


# ------------------------------------------------------------------------------------------- deletion


def deletion_image() -> torch.Tensor:
    """Ones in R, random values elsewhere (which the toy model ignores)."""
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    image[:, REGION] = 1.0
    return image


HIGH, LOW, HALF = sigmoid(5.0), sigmoid(-5.0), 0.5


def test_deletion_curves_of_perfect_inverted_and_uniform_maps():
    # steps 4: 0, 64, 128, 192, 256 pixels removed.
    # perfect: R goes first -> m = 0 after 64.  inverted: R goes last -> m = 1 until 256.
    # uniform: ties go in row-major order; after 128 pixels rows 0..7 are gone (half of R), after 192 all of R.
    image = deletion_image()
    images = image.expand(4, -1, -1, -1).clone()
    heatmaps = torch.stack([PERFECT, INVERTED, UNIFORM, PERFECT])
    classes = torch.tensor([0, 0, 0, 1])
    auc, curve = M.deletion(M.Scorer(RegionModel(), batch_size=4), images, heatmaps, classes, steps=4)
    expected = torch.tensor(
        [
            [HIGH, LOW, LOW, LOW, LOW],
            [HIGH, HIGH, HIGH, HIGH, LOW],
            [HIGH, HIGH, HALF, LOW, LOW],
            [1 - HIGH, 1 - LOW, 1 - LOW, 1 - LOW, 1 - LOW],  # class 1's probability is 1 - class 0's
        ]
    )
    assert curve.shape == (4, 5)
    assert_close(curve, expected)
    hand = [
        0.25 * ((HIGH + LOW) / 2 + 3 * LOW),
        0.25 * (3 * HIGH + (HIGH + LOW) / 2),
        0.25 * (HIGH + (HIGH + HALF) / 2 + (HALF + LOW) / 2 + LOW),
        0.25 * ((2 - HIGH - LOW) / 2 + 3 * (1 - LOW)),
    ]
    assert_close(auc, torch.tensor(hand))
    assert auc[0] < auc[2] < auc[1]


def test_deletion_endpoints_and_auc_are_the_trapezoid_of_the_curve():
    image = deletion_image()
    heatmaps = torch.stack([PERFECT, INVERTED, random_map(5)])
    images = image.expand(3, -1, -1, -1)
    classes = torch.zeros(3, dtype=torch.long)
    scorer = M.Scorer(RegionModel())
    auc, curve = M.deletion(scorer, images, heatmaps, classes, steps=16)
    assert curve.shape == (3, 17)
    unperturbed, _ = scorer(images, classes)
    assert_close(curve[:, 0], unperturbed)
    assert_close(curve[:, -1], torch.full((3,), LOW))  # everything set to the baseline 0
    fractions = [k / 16 for k in range(17)]
    for i in range(3):
        assert auc[i].item() == pytest.approx(own_trapezoid(curve[i].tolist(), fractions), abs=1e-6)
    perfect, inverted, random = auc.tolist()
    assert perfect < random < inverted


def test_deletion_random_map_follows_the_share_of_the_region_removed():
    heatmap = random_map(7)
    image = deletion_image()
    _, curve = M.deletion(M.Scorer(RegionModel()), image[None], heatmap[None], torch.tensor([0]), steps=8)
    order = torch.argsort(heatmap.flatten(), descending=True)
    for k in range(9):
        removed = torch.zeros(PIXELS, dtype=torch.bool)
        removed[order[: k * PIXELS // 8]] = True
        expected = image.clone()
        expected[:, removed.view(SIZE, SIZE)] = 0.0
        assert curve[0, k].item() == pytest.approx(region_prob(expected), abs=1e-6)


def test_deletion_baseline_value_and_image():
    image = deletion_image()
    scorer = M.Scorer(RegionModel())
    classes = torch.tensor([0])
    _, curve = M.deletion(scorer, image[None], PERFECT[None], classes, steps=4, baseline=0.5)
    assert_close(curve[0], torch.tensor([HIGH, HALF, HALF, HALF, HALF]))  # m = 0.5 once R is replaced
    baseline = torch.full((1, 3, SIZE, SIZE), 0.8)
    baseline[:, 1] = 0.2  # channel mean 0.6 -> logit 1
    _, curve = M.deletion(scorer, image[None], PERFECT[None], classes, steps=4, baseline=baseline)
    assert_close(curve[0], torch.tensor([HIGH] + [sigmoid(1.0)] * 4))


@pytest.mark.parametrize("baseline", [0.0, 0.3])
def test_faithfulness_of_several_maps_equals_the_single_calls_and_scores_each_image_once(baseline):
    """M maps of B images through all four protocols at once: the single calls' values, with every
    shared image (unperturbed, fully deleted, blurred; with a zero baseline the positive perturbation
    steps, which lie on the deletion curve) scored once."""
    images = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(11))
    images[:, :, REGION] += 0.5
    maps = torch.stack([torch.stack([random_map(10 * m + b) for b in range(3)]) for m in range(4)])
    maps[1, 0] = PERFECT  # ties, broken by position alike in both paths
    classes = torch.tensor([0, 1, 0])
    model = RegionModel()
    scorer = M.Scorer(model, batch_size=7)
    together = M.faithfulness(scorer, images, maps, classes, steps=20, baseline=baseline, blur_sigma=2.0)
    scored = sum(model.calls)
    for m in range(4):
        expected = {
            "deletion": M.deletion(scorer, images, maps[m], classes, 20, baseline),
            "insertion": M.insertion(scorer, images, maps[m], classes, 20, 2.0),
            "perturbation_positive": M.perturbation(scorer, images, maps[m], classes, positive=True),
            "perturbation_negative": M.perturbation(scorer, images, maps[m], classes, positive=False),
        }
        for protocol, (auc, curve) in expected.items():
            assert_close(together[protocol][0][m], auc, rtol=0, atol=1e-6)
            assert_close(together[protocol][1][m], curve, rtol=0, atol=1e-6)
    # Per image: the unperturbed, the blurred and the fully deleted image; per map and image the
    # inner steps: 19 of deletion, 19 of insertion, 9 of each perturbation test, of which the
    # positive one's are deletion's own with a zero baseline (its 0.1 … 0.9 are deletion's 2/20 … 18/20).
    inner = 19 + 19 + 9 + (0 if baseline == 0.0 else 9)
    assert scored == 3 * 3 + 4 * 3 * inner
    single = M.faithfulness(scorer, images, maps[0], classes, steps=20, baseline=baseline, blur_sigma=2.0)
    for protocol, (auc, curve) in single.items():
        assert auc.shape == (3,) and curve.shape[0] == 3
        assert_close(auc, together[protocol][0][0], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="unknown protocols"):
        M.faithfulness(scorer, images, maps, classes, ["deletion", "wrong"])


# ------------------------------------------------------------------------------------------ insertion


def test_insertion_curves_of_perfect_inverted_and_uniform_maps():
    image = deletion_image()
    blurred = reference_blur(image[None], 2.0)[0].float()
    b = region_prob(blurred)  # R still blurred
    images = image.expand(3, -1, -1, -1)
    heatmaps = torch.stack([PERFECT, INVERTED, UNIFORM])
    auc, curve = M.insertion(
        M.Scorer(RegionModel(), batch_size=4), images, heatmaps, torch.zeros(3, dtype=torch.long), 4, 2.0
    )
    # uniform: rows 0..7 of the original after 128 pixels (top half of R original, bottom half blurred)
    half = blurred.clone()
    half[:, :8] = image[:, :8]
    expected = torch.tensor(
        [
            [b, HIGH, HIGH, HIGH, HIGH],
            [b, b, b, b, HIGH],
            [b, b, region_prob(half), HIGH, HIGH],
        ]
    )
    assert b < 0.99 * HIGH  # the blur does change the score
    assert_close(curve, expected, **FLOAT32)
    for i in range(3):
        assert auc[i].item() == pytest.approx(own_trapezoid(expected[i].tolist(), [0, 0.25, 0.5, 0.75, 1]), abs=1e-5)
    assert auc[0] > auc[2] > auc[1]


def test_insertion_endpoints_and_ordering_with_a_random_map():
    image = deletion_image()
    images = image.expand(3, -1, -1, -1)
    heatmaps = torch.stack([PERFECT, INVERTED, random_map(11)])
    classes = torch.zeros(3, dtype=torch.long)
    scorer = M.Scorer(RegionModel())
    auc, curve = M.insertion(scorer, images, heatmaps, classes, steps=16)  # default blur sigma 5
    assert curve.shape == (3, 17)
    assert_close(curve[:, 0], scorer(M.gaussian_blur(images, 5.0), classes)[0])
    assert_close(curve[:, -1], scorer(images, classes)[0])
    fractions = [k / 16 for k in range(17)]
    for i in range(3):
        assert auc[i].item() == pytest.approx(own_trapezoid(curve[i].tolist(), fractions), abs=1e-6)
    perfect, inverted, random = auc.tolist()
    assert perfect > random > inverted


# --------------------------------------------------------------------------------------- perturbation

# 10 % steps of 256 pixels remove round(0.1 k * 256) = 0, 26, 51, 77, 102, 128, 154, 179, 205, 230 pixels.


def perturbation_case(heatmap, threshold, positive=True, target=0):
    """Toy model with class-0 logit ``10 (m - threshold)`` on an all-ones image."""
    model = RegionModel(gain=10.0, offset=10.0 * threshold)
    images = torch.ones(1, 3, SIZE, SIZE)
    return M.perturbation(M.Scorer(model), images, heatmap[None], torch.tensor([target]), positive=positive)


def test_perturbation_hit_flips_at_a_known_step():
    # Most relevant first = R first: the share of R left is 1, 38/64, 13/64, 0, ... -> with threshold 0.1
    # the hits are 1, 1, 1, 0, ...; the trapezoid over 0, 0.1, ..., 0.9 including the 0 % step:
    auc, hits = perturbation_case(PERFECT, threshold=0.1)
    assert hits.tolist() == [[1, 1, 1, 0, 0, 0, 0, 0, 0, 0]]
    hand = 100 * (0.1 * (1 + 1) / 2 * 2 + 0.1 * (1 + 0) / 2 + 0)  # = 25
    assert auc.item() == pytest.approx(hand, abs=1e-4)
    assert auc.item() == pytest.approx(25.0, abs=1e-4)


def test_perturbation_always_hit_integrates_to_90_as_the_axis_ends_at_90_percent():
    auc, hits = perturbation_case(PERFECT, threshold=-1.0)
    assert hits.tolist() == [[1.0] * 10]
    assert auc.item() == pytest.approx(90.0, abs=1e-4)


def test_perturbation_negative_removes_the_least_relevant_first():
    # least relevant first: the 192 pixels outside R go first; at 90 % (230 pixels) 38 of R are gone,
    # 26/64 = 0.41 of R is left: a miss for threshold 0.5, a hit for threshold 0.1.
    auc, hits = perturbation_case(PERFECT, threshold=0.5, positive=False)
    assert hits.tolist() == [[1] * 9 + [0]]
    assert auc.item() == pytest.approx(100 * (0.1 * 8 + 0.1 * 0.5), abs=1e-4)  # 85
    auc, hits = perturbation_case(PERFECT, threshold=0.1, positive=False)
    assert hits.tolist() == [[1] * 10]
    assert auc.item() == pytest.approx(90.0, abs=1e-4)


def test_perturbation_of_a_missed_target_starts_at_zero():
    # class 1 is predicted when the class-0 logit is negative, i.e. once less than half of R is left
    auc, hits = perturbation_case(PERFECT, threshold=0.5, target=1)
    assert hits.tolist() == [[0, 0, 1, 1, 1, 1, 1, 1, 1, 1]]
    assert auc.item() == pytest.approx(100 * (0.1 * 0.5 + 0.1 * 7), abs=1e-4)  # 75


def test_perturbation_of_a_uniform_map_goes_in_row_major_order():
    # rows go from the top; R is left at 1, 1, 1, 56/64, 46/64, 32/64, 18/64, 8/64, 0, 0 (threshold 0.45)
    auc, hits = perturbation_case(UNIFORM, threshold=0.45)
    assert hits.tolist() == [[1, 1, 1, 1, 1, 1, 0, 0, 0, 0]]
    assert auc.item() == pytest.approx(100 * (0.1 * 5 + 0.1 * 0.5), abs=1e-4)  # 55


def test_perturbation_batched_ordering_perfect_random_inverted():
    model = RegionModel()  # threshold 0.5
    images = torch.ones(3, 3, SIZE, SIZE)
    heatmaps = torch.stack([PERFECT, random_map(13), INVERTED])
    classes = torch.zeros(3, dtype=torch.long)
    positive, hits = M.perturbation(M.Scorer(model, batch_size=7), images, heatmaps, classes, positive=True)
    assert hits.shape == (3, 10)
    assert hits[:, 0].tolist() == [1, 1, 1]  # the 0 % step is the unperturbed image
    fractions = [k / 10 for k in range(10)]
    for i in range(3):
        assert positive[i].item() == pytest.approx(100 * own_trapezoid(hits[i].tolist(), fractions), abs=1e-4)
    assert positive[0] < positive[1] < positive[2]
    negative, _ = M.perturbation(M.Scorer(model), images, heatmaps, classes, positive=False)
    assert negative[0] > negative[1] > negative[2]


# -------------------------------------------------------------------------------------- gaussian blur


def reference_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """2-D Gaussian blur written out in numpy: radius ceil(3 sigma), reflect padding (float64)."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-(offsets**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    x = images.double().numpy()
    height, width = x.shape[-2:]
    padded = np.pad(x, ((0, 0), (0, 0), (radius, radius), (radius, radius)), mode="reflect")
    out = np.zeros_like(x)
    for i, ki in enumerate(kernel):
        for j, kj in enumerate(kernel):
            out += ki * kj * padded[..., i : i + height, j : j + width]
    return torch.from_numpy(out)


def test_gaussian_blur_preserves_a_constant_image():
    images = torch.full((2, 3, SIZE, SIZE), 0.75)
    assert_close(M.gaussian_blur(images, 5.0), images)


@pytest.mark.parametrize("sigma", [0.0, -1.0])
def test_gaussian_blur_sigma_zero_is_identity(sigma):
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(M.gaussian_blur(images, sigma), images)


def test_gaussian_blur_reduces_the_variance_of_a_random_image():
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = M.gaussian_blur(images, 1.5)
    assert out.shape == images.shape
    assert (out.var(dim=(2, 3)) < 0.5 * images.var(dim=(2, 3))).all()


def test_gaussian_blur_of_an_impulse_is_the_kernel_per_channel():
    images = torch.zeros(1, 3, 21, 21)
    images[0, 1, 10, 10] = 1.0
    out = M.gaussian_blur(images, 1.0)
    kernel = torch.exp(-(torch.arange(-3.0, 4.0) ** 2) / 2)
    kernel = kernel / kernel.sum()
    expected = torch.zeros(21, 21)
    expected[7:14, 7:14] = kernel[:, None] * kernel[None, :]
    assert_close(out[0, 1], expected)
    assert torch.equal(out[0, 0], torch.zeros(21, 21)) and torch.equal(out[0, 2], torch.zeros(21, 21))


def test_gaussian_blur_matches_a_reference_with_reflect_padding():
    images = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    for sigma in (0.7, 5.0):
        assert_close(M.gaussian_blur(images, sigma), reference_blur(images, sigma).float(), **FLOAT32)


# -------------------------------------------------------------------------------------- pointing game


def one_hot(y: int, x: int, size: int = SIZE) -> torch.Tensor:
    heatmap = torch.zeros(size, size)
    heatmap[y, x] = 1.0
    return heatmap


def test_pointing_game_inside_near_and_far():
    mask = square(4, 4, 4)  # rows/cols 4..7
    heatmaps = torch.stack([one_hot(5, 5), one_hot(5, 9), one_hot(10, 10), one_hot(15, 15)])
    masks = mask.expand(4, -1, -1)
    # (5, 9) is 2 from (5, 7); (10, 10) is sqrt(18) = 4.24 from (7, 7) (Chebyshev 3, Manhattan 6)
    assert M.pointing_game(heatmaps, masks, tolerance=0).tolist() == [1, 0, 0, 0]
    assert M.pointing_game(heatmaps, masks, tolerance=1).tolist() == [1, 0, 0, 0]
    assert M.pointing_game(heatmaps, masks, tolerance=2).tolist() == [1, 1, 0, 0]
    assert M.pointing_game(heatmaps, masks, tolerance=4).tolist() == [1, 1, 0, 0]
    assert M.pointing_game(heatmaps, masks, tolerance=5).tolist() == [1, 1, 1, 0]


def test_pointing_game_default_tolerance_is_15_pixels_euclidean():
    mask = torch.zeros(48, 48, dtype=torch.bool)
    mask[0, 0] = True
    points = [(0, 15), (0, 16), (9, 12), (9, 13)]  # distances 15, 16, 15, 15.8
    heatmaps = torch.stack([one_hot(y, x, 48) for y, x in points])
    assert M.pointing_game(heatmaps, mask.expand(4, -1, -1)).tolist() == [1, 0, 1, 0]


def test_pointing_game_ties_take_the_first_maximum_and_empty_masks_miss():
    mask = square(12, 12, 4)
    first_far = one_hot(0, 0) + one_hot(13, 13)  # first maximum (row-major) far from the mask
    first_inside = one_hot(13, 13) + one_hot(14, 0)
    heatmaps = torch.stack([first_far, first_inside, PERFECT])
    masks = torch.stack([mask, mask, torch.zeros(SIZE, SIZE, dtype=torch.bool)])
    assert M.pointing_game(heatmaps, masks, tolerance=1).tolist() == [0, 1, 0]


# ------------------------------------------------------------------------------------ energy pointing


def test_energy_pointing_game_known_maps():
    mask = REGION
    negative_outside = torch.where(mask, 1.0, -5.0)
    graded = torch.zeros(SIZE, SIZE)
    graded[5, 5], graded[0, 0], graded[0, 1] = 3.0, 1.0, -4.0  # positive mass 3 inside, 1 outside
    heatmaps = torch.stack([PERFECT, INVERTED, torch.full((SIZE, SIZE), 0.7), negative_outside, graded])
    result = M.energy_pointing_game(heatmaps, mask.expand(5, -1, -1))
    assert_close(result, torch.tensor([1.0, 0.0, 64 / 256, 1.0, 0.75]))


def test_energy_pointing_game_without_positive_mass_is_zero():
    heatmaps = torch.stack([torch.zeros(SIZE, SIZE), -PERFECT])
    assert M.energy_pointing_game(heatmaps, REGION.expand(2, -1, -1)).tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------------------- pixel AUROC


def own_auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Pairs (positive, negative) ordered right count 1, ties count 1/2."""
    scores, labels = scores.flatten().double(), labels.flatten().bool()
    pos, neg = scores[labels], scores[~labels]
    greater = (pos[:, None] > neg[None, :]).sum().item()
    equal = (pos[:, None] == neg[None, :]).sum().item()
    return (greater + 0.5 * equal) / (len(pos) * len(neg))


def test_pixel_auroc_perfect_inverted_uniform():
    heatmaps = torch.stack([PERFECT, INVERTED, UNIFORM])
    assert_close(M.pixel_auroc(heatmaps, REGION.expand(3, -1, -1)), torch.tensor([1.0, 0.0, 0.5]))


def test_pixel_auroc_hand_example_with_ties():
    # positives 3, 2; negatives 2, 1, 0: 3 wins thrice, 2 wins twice and ties once -> 5.5 / 6
    heatmap = torch.tensor([[3.0, 2.0, 2.0, 1.0, 0.0]])
    mask = torch.tensor([[True, True, False, False, False]])
    assert M.pixel_auroc(heatmap, mask).item() == pytest.approx(5.5 / 6, abs=1e-7)


def test_pixel_auroc_random_map_is_near_chance_and_matches_pair_counting():
    generator = torch.Generator().manual_seed(21)
    heatmaps = torch.rand(3, 32, 32, generator=generator)
    heatmaps[2] = (heatmaps[2] * 4).floor()  # many ties
    masks = torch.stack([square(8, 8, 16, 32), square(0, 0, 5, 32), square(10, 3, 20, 32)])
    result = M.pixel_auroc(heatmaps, masks)
    for i in range(3):
        assert result[i].item() == pytest.approx(own_auroc(heatmaps[i], masks[i]), abs=1e-6)
    assert abs(result[0].item() - 0.5) < 0.1
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        return
    for i in range(3):
        expected = roc_auc_score(masks[i].flatten().numpy(), heatmaps[i].flatten().numpy())
        assert result[i].item() == pytest.approx(expected, abs=1e-6)


def test_pixel_auroc_is_nan_for_an_empty_or_full_mask():
    masks = torch.stack([torch.zeros(SIZE, SIZE, dtype=torch.bool), torch.ones(SIZE, SIZE, dtype=torch.bool), REGION])
    result = M.pixel_auroc(random_map(0).expand(3, -1, -1), masks)
    assert math.isnan(result[0]) and math.isnan(result[1]) and not math.isnan(result[2])


# ------------------------------------------------------------------------------------------- pixel AP


def own_average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """scikit-learn's definition: sum over distinct thresholds (descending) of (R_k - R_{k-1}) P_k."""
    pairs = list(zip(scores.flatten().double().tolist(), labels.flatten().bool().tolist(), strict=True))
    positives = sum(label for _, label in pairs)
    ap, previous_recall = 0.0, 0.0
    for threshold in sorted({s for s, _ in pairs}, reverse=True):
        selected = [label for s, label in pairs if s >= threshold]
        true_pos = sum(selected)
        precision, recall = true_pos / len(selected), true_pos / positives
        ap += (recall - previous_recall) * precision
        previous_recall = recall
    return ap


def test_pixel_ap_perfect_uniform_inverted():
    graded_inverted = torch.where(REGION, 0.0, 1000.0) + torch.arange(PIXELS, dtype=torch.float).view(SIZE, SIZE)
    heatmaps = torch.stack([PERFECT, UNIFORM, graded_inverted])
    result = M.pixel_ap(heatmaps, REGION.expand(3, -1, -1))
    # positives ranked 193..256, in order: precision k / (192 + k) at the k-th
    inverted = sum(k / (192 + k) for k in range(1, 65)) / 64
    assert result[0].item() == pytest.approx(1.0, abs=1e-7)
    assert result[1].item() == pytest.approx(64 / 256, abs=1e-7)
    assert result[2].item() == pytest.approx(inverted, abs=1e-6)


def test_pixel_ap_hand_example_with_ties():
    # thresholds 0.9: P 1, R 1/2; 0.8: P 2/3, R 1 -> AP = 1/2 + 1/2 * 2/3
    heatmap = torch.tensor([[0.9, 0.8, 0.8, 0.1]])
    mask = torch.tensor([[True, False, True, False]])
    assert M.pixel_ap(heatmap, mask).item() == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-7)


def test_pixel_ap_matches_scikit_learn_definition_on_random_maps():
    generator = torch.Generator().manual_seed(22)
    heatmaps = torch.rand(3, SIZE, SIZE, generator=generator)
    heatmaps[1] = (heatmaps[1] * 5).floor()  # many ties
    masks = torch.stack([REGION, square(0, 0, 3), torch.rand(SIZE, SIZE, generator=generator) < 0.3])
    result = M.pixel_ap(heatmaps, masks)
    for i in range(3):
        assert result[i].item() == pytest.approx(own_average_precision(heatmaps[i], masks[i]), abs=1e-6)
    try:
        from sklearn.metrics import average_precision_score
    except ImportError:
        return
    for i in range(3):
        expected = average_precision_score(masks[i].flatten().numpy(), heatmaps[i].flatten().numpy())
        assert result[i].item() == pytest.approx(expected, abs=1e-6)


def test_pixel_ap_is_nan_for_an_empty_mask():
    masks = torch.stack([torch.zeros(SIZE, SIZE, dtype=torch.bool), REGION])
    result = M.pixel_ap(random_map(1).expand(2, -1, -1), masks)
    assert math.isnan(result[0]) and not math.isnan(result[1])


# --------------------------------------------------------------------------------------- segmentation


def test_segmentation_perfect_and_inverted():
    accuracy, miou = M.segmentation(torch.stack([PERFECT, INVERTED]), REGION.expand(2, -1, -1))
    assert accuracy.tolist() == [1.0, 0.0]
    assert miou.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("value", [0.0, 1.0, 0.7])
def test_segmentation_uniform_map_predicts_background_everywhere(value):
    # nothing is above the mean: accuracy = background share; IoU foreground 0, background = its share
    background = 192 / 256
    accuracy, miou = M.segmentation(torch.full((1, SIZE, SIZE), value), REGION[None])
    assert accuracy.item() == pytest.approx(background)
    assert miou.item() == pytest.approx((0 + background) / 2)


def test_segmentation_hand_example():
    heatmap = torch.zeros(1, 4, 4)
    heatmap[0, 0, 0], heatmap[0, 0, 1], heatmap[0, 1, 0] = 4.0, 3.0, 2.0  # mean 9/16: these three are foreground
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True  # the top-left 2x2: one foreground pixel (1, 1) is missed
    accuracy, miou = M.segmentation(heatmap, mask)
    assert accuracy.item() == pytest.approx(15 / 16)
    assert miou.item() == pytest.approx((3 / 4 + 12 / 13) / 2)


# ------------------------------------------------------------------------------- class discrimination


def test_class_discrimination_known_maps():
    target, other = square(0, 0, 6), square(8, 8, 6)  # equal areas, disjoint
    both = (target | other).float()
    heatmaps = torch.stack([target.float(), other.float(), both, torch.full((SIZE, SIZE), 0.3)])
    result = M.class_discrimination(heatmaps, target.expand(4, -1, -1), other.expand(4, -1, -1))
    assert_close(result, torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_class_discrimination_of_a_class_agnostic_map_averages_to_zero():
    a, b = square(1, 1, 5), square(9, 6, 6)
    heatmap = random_map(31)
    for_a = M.class_discrimination(heatmap[None], a[None], b[None])
    for_b = M.class_discrimination(heatmap[None], b[None], a[None])
    assert for_a.abs().item() > 0.01  # not trivially zero per target
    assert ((for_a + for_b) / 2).item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------- spearman


def own_spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of average ranks (rank = #smaller + (#equal + 1) / 2)."""

    def ranks(x):
        x = x.flatten().double()
        return (x[:, None] > x[None, :]).sum(1) + ((x[:, None] == x[None, :]).sum(1) + 1) / 2

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def test_spearman_identical_reversed_and_monotone():
    x = random_map(41)[None]
    assert M.spearman(x, x).item() == pytest.approx(1.0)
    assert M.spearman(x, -x).item() == pytest.approx(-1.0)
    assert M.spearman(x, torch.exp(3 * x) + 7).item() == pytest.approx(1.0)


def test_spearman_hand_example_with_ties():
    # ranks a = 1, 2.5, 2.5, 4 and b = 1, 2, 3, 4: 4.5 / sqrt(4.5 * 5)
    a = torch.tensor([[1.0, 2.0, 2.0, 3.0]])
    b = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert M.spearman(a, b).item() == pytest.approx(4.5 / math.sqrt(4.5 * 5), abs=1e-6)


def test_spearman_matches_rank_correlation_per_row():
    generator = torch.Generator().manual_seed(42)
    a = (torch.rand(3, 8, 8, generator=generator) * 5).floor()
    b = a + torch.rand(3, 8, 8, generator=generator) * 3
    b[2] = (b[2] * 2).round()
    result = M.spearman(a, b)
    assert result.shape == (3,)
    for i in range(3):
        assert result[i].item() == pytest.approx(own_spearman(a[i], b[i]), abs=1e-6)
    try:
        from scipy.stats import spearmanr
    except ImportError:
        return
    for i in range(3):
        assert result[i].item() == pytest.approx(spearmanr(a[i].flatten(), b[i].flatten())[0], abs=1e-6)


def test_spearman_of_a_constant_map_is_nan():
    x = random_map(43)[None]
    constant = torch.full((1, SIZE, SIZE), 0.7)
    assert math.isnan(M.spearman(constant, x).item())
    assert math.isnan(M.spearman(x, constant).item())


# ----------------------------------------------------------------------------- cascading randomisation


def all_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters()]


def block(index: int, model: nn.Module) -> list[str]:
    return [n for n in all_names(model) if n.startswith(f"blocks.{index}.")]


def check_partition(model: nn.Module, steps) -> None:
    listed = [name for _, names in steps for name in names]
    assert sorted(listed) == sorted(all_names(model))
    assert len(listed) == len(set(listed))


def test_cascading_randomisation_steps_of_a_timm_vit():
    model = make_timm()
    steps = M.cascading_randomisation_steps(model)
    assert [label for label, _ in steps] == ["head", "block 2", "block 1", "block 0", "embeddings"]
    named = dict(steps)
    assert sorted(named["head"]) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    for index in range(3):
        assert named[f"block {index}"] == block(index, model)
    assert sorted(named["embeddings"]) == ["cls_token", "patch_embed.proj.bias", "patch_embed.proj.weight", "pos_embed"]
    check_partition(model, steps)


def test_cascading_randomisation_steps_of_other_timm_layouts():
    pooled = make_timm(class_token=False, global_pool="avg")  # fc_norm instead of norm, no class token
    steps = dict(M.cascading_randomisation_steps(pooled))
    assert sorted(steps["head"]) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert sorted(steps["embeddings"]) == ["patch_embed.proj.bias", "patch_embed.proj.weight", "pos_embed"]
    check_partition(pooled, steps.items())

    registers = make_timm(reg_tokens=2)
    steps = dict(M.cascading_randomisation_steps(registers))
    assert "reg_token" in steps["embeddings"] and "cls_token" in steps["embeddings"]
    check_partition(registers, steps.items())

    deep = make_timm(depth=11, embed_dim=8, num_heads=2)  # blocks 10, 9, ... numerically, not as text
    labels = [label for label, _ in M.cascading_randomisation_steps(deep)]
    assert labels == ["head", *(f"block {i}" for i in range(10, -1, -1)), "embeddings"]


#: each family's block parameter prefix, as its modelling code names it (the test's own reference,
#: independent of the adapters): (factory, prefix of block N, head names, embedding names)
FAMILY_BLOCKS = {
    "hf_vit": (
        "vit.layers.{}.",
        ["classifier.bias", "classifier.weight", "vit.layernorm.bias", "vit.layernorm.weight"],
        ["vit.embeddings.cls_token", "vit.embeddings.patch_embeddings.projection.bias",
         "vit.embeddings.patch_embeddings.projection.weight", "vit.embeddings.position_embeddings"],
    ),
    "openclip": (
        "visual.transformer.resblocks.{}.",
        ["visual.ln_post.bias", "visual.ln_post.weight", "visual.proj"],
        ["visual.class_embedding", "visual.conv1.weight", "visual.ln_pre.bias", "visual.ln_pre.weight",
         "visual.positional_embedding"],
    ),
    "torchvision": (
        "encoder.layers.encoder_layer_{}.",
        ["encoder.ln.bias", "encoder.ln.weight", "heads.head.bias", "heads.head.weight"],
        ["class_token", "conv_proj.bias", "conv_proj.weight", "encoder.pos_embedding"],
    ),
    "hf_clip": (
        "vision_model.encoder.layers.{}.",
        ["vision_model.post_layernorm.bias", "vision_model.post_layernorm.weight", "visual_projection.weight"],
        ["vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
         "vision_model.embeddings.position_embedding.weight", "vision_model.pre_layrnorm.bias",
         "vision_model.pre_layrnorm.weight"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILY_BLOCKS))
def test_cascading_randomisation_has_one_step_per_block_in_every_family(family):
    """Before: one step that randomised everything outside timm (blocks found by the prefix ``blocks.``)."""
    model = FACTORIES[family]()
    prefix, head, embeddings = FAMILY_BLOCKS[family]
    names = all_names(model)
    stem = prefix.split("{}")[0]
    depth = len({n[len(stem) :].split(".")[0] for n in names if n.startswith(stem)})
    steps = M.cascading_randomisation_steps(model)
    assert [label for label, _ in steps] == ["head", *(f"block {i}" for i in reversed(range(depth))), "embeddings"]
    named = dict(steps)
    assert sorted(named["head"]) == head
    assert sorted(named["embeddings"]) == embeddings
    for index in range(depth):
        assert named[f"block {index}"] == [n for n in names if n.startswith(prefix.format(index))]
    listed = [name for _, group in steps for name in group]
    assert len(listed) == len(set(listed))
    # Only what the image's output does not depend on is left out: a CLIP model's text tower.
    image_tower = ("visual.", "vision_model.", "visual_projection.")
    clip = family in ("openclip", "hf_clip")
    assert sorted(listed) == sorted(n for n in names if not clip or n.startswith(image_tower))


def test_cascading_randomisation_puts_layers_between_blocks_with_the_block_before(monkeypatch):
    """A layer outside the blocks between two of them (Swin's patch merging, when every stage's blocks
    are the adapter's) is randomised with the block before it, not with the head or the embeddings."""
    from conftest import make_swin
    from gmar.adapters.swin import SwinAdapter

    model = make_swin("timm_swin")
    every = property(lambda self: [block for stage in self.model.layers for block in stage.blocks])
    monkeypatch.setattr(SwinAdapter, "blocks", every)
    steps = dict(M.cascading_randomisation_steps(model))
    first = len(model.layers[0].blocks)  # the index of stage 1's first block
    merging = [n for n, _ in model.layers[1].downsample.named_parameters(prefix="layers.1.downsample")]
    assert merging and set(merging) <= set(steps[f"block {first - 1}"])
    assert not set(merging) & set(steps["embeddings"]) and not set(merging) & set(steps["head"])


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    return make_timm()


@pytest.fixture(scope="module")
def vit_images() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_cascading_randomisation_leaves_the_model_alone_and_weight_free_maps_survive(vit, vit_images):
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    results = M.cascading_randomisation(vit, lambda m: vit_images.mean(dim=1), seed=0)
    assert [label for label, _ in results] == ["head", "block 2", "block 1", "block 0", "embeddings"]
    for _, correlation in results:
        assert correlation.shape == (2,)
        assert_close(correlation, torch.ones(2))
    after = vit.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def test_cascading_randomisation_is_cascading(vit):
    """A "map" that is block 0's fc1 weight survives the head and blocks 2, 1, and no step after."""

    def explain(m):
        return m.blocks[0].mlp.fc1.weight.detach().view(1, 128, 32).clone()

    results = dict(M.cascading_randomisation(vit, explain, seed=3))
    for label in ("head", "block 2", "block 1"):
        assert results[label].item() == pytest.approx(1.0)
    for label in ("block 0", "embeddings"):
        assert abs(results[label].item()) < 0.2  # an independent draw


def test_cascading_randomisation_draws_from_each_parameters_own_distribution():
    model = make_timm()
    with torch.no_grad():
        model.blocks[0].norm1.weight.fill_(1.0)  # std 0: drawn with std 0.02 around 1
    seen: list[nn.Module] = []

    def explain(m):
        seen.append(m)
        return torch.arange(16.0).view(1, 4, 4)

    M.cascading_randomisation(model, explain, seed=0)
    assert seen[0] is model and all(m is seen[1] for m in seen[1:]) and seen[1] is not model
    original = {k: v.detach() for k, v in model.named_parameters()}
    twin = {k: v.detach() for k, v in seen[1].named_parameters()}
    for name, param in original.items():
        drawn = twin[name]
        assert not torch.equal(drawn, param), name
        if param.numel() >= 512:
            assert abs(drawn.mean() - param.mean()) < 0.1 * param.std() + 1e-3, name
            assert 0.85 < float(drawn.std() / param.std()) < 1.15, name
    norm = twin["blocks.0.norm1.weight"]
    assert abs(norm.mean().item() - 1.0) < 0.02 and 0.01 < norm.std().item() < 0.03


def test_cascading_randomisation_of_grad_cam_decorrelates(vit, vit_images):
    def explain(m):
        return gmar.explain(m, vit_images, "gradcam").heatmap

    results = M.cascading_randomisation(vit, explain, seed=0)
    correlations = torch.stack([c for _, c in results])
    assert correlations.shape == (5, 2)
    assert (correlations < 0.99).any()


def test_cascading_randomisation_is_seeded(vit):
    def explain(m):
        return m.head.weight.detach()[None].clone()

    first = [c for _, c in M.cascading_randomisation(vit, explain, seed=5)]
    again = [c for _, c in M.cascading_randomisation(vit, explain, seed=5)]
    other = [c for _, c in M.cascading_randomisation(vit, explain, seed=6)]
    assert torch.equal(torch.stack(first), torch.stack(again))
    assert not torch.equal(torch.stack(first), torch.stack(other))


# -------------------------------------------------------------------------------------- head ablation


def zero_heads(model: nn.Module, heads: set[int], per_layer: int) -> list:
    """Own pre-hooks on every ``blocks[i].attn.proj`` that zero the listed flat heads ``l * H + h``."""

    def make(layer):
        def hook(module, args):
            x = args[0].clone()
            b, n, c = x.shape
            x = x.view(b, n, per_layer, c // per_layer)
            for h in range(per_layer):
                if layer * per_layer + h in heads:
                    x[:, :, h] = 0.0
            return (x.view(b, n, c),)

        return hook

    return [blk.attn.proj.register_forward_pre_hook(make(i)) for i, blk in enumerate(model.blocks)]


@torch.no_grad()
def probabilities_with(model, images, classes, heads: set[int]) -> torch.Tensor:
    handles = zero_heads(model, heads, 4)
    try:
        logits = model(images)
    finally:
        for handle in handles:
            handle.remove()
    return logits.softmax(dim=1)[torch.arange(len(classes)), classes]


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_rank_heads_orders_by_decreasing_weight():
    weights = torch.tensor([[[0.1, 0.4], [0.3, 0.2]], [[0.5, 0.5], [0.5, 0.1]]])
    assert M.rank_heads(weights).tolist() == [[1, 2, 3, 0], [0, 1, 2, 3]]


def test_head_ablation_curve_against_own_hooks(vit, vit_images):
    adapter = gmar.get_adapter(vit)
    classes = torch.tensor([0, 3])
    weights = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(2))
    rankings = M.rank_heads(weights)
    scorer = M.Scorer(vit)
    auc, curve = M.head_ablation(scorer, adapter, vit_images, classes, rankings)
    assert curve.shape == (2, 13)
    assert no_hooks(vit)
    assert_close(curve[:, 0], scorer(vit_images, classes)[0], **FLOAT32)
    all_off = probabilities_with(vit, vit_images, classes, set(range(12)))
    assert_close(curve[:, -1], all_off, **FLOAT32)
    assert not torch.allclose(curve[:, 0], curve[:, -1])
    for i in range(2):
        for k in (1, 5):
            removed = set(rankings[i, :k].tolist())
            expected = probabilities_with(vit, vit_images[i : i + 1], classes[i : i + 1], removed)
            assert curve[i, k].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
        assert auc[i].item() == pytest.approx(own_trapezoid(curve[i].tolist(), [k / 12 for k in range(13)]), abs=1e-6)


def test_knockout_drops_switch_each_head_off_alone(vit, vit_images):
    adapter = gmar.get_adapter(vit)
    classes = torch.tensor([2, 0])
    drops = M.knockout_drops(M.Scorer(vit, batch_size=5), adapter, vit_images, classes)
    assert drops.shape == (2, 12) and no_hooks(vit)
    full = probabilities_with(vit, vit_images, classes, set())
    for head in range(12):
        expected = full - probabilities_with(vit, vit_images, classes, {head})
        assert_close(drops[:, head], expected, **FLOAT32)
    # the oracle ranking is the order of the drops
    assert M.rank_heads(drops)[0, 0].item() == int(drops[0].argmax())


#: where each family's modelling code merges a layer's heads: (factory, module whose input is the heads'
#: outputs concatenated, with {} for the layer); the test's own reference, independent of the adapters
MERGED_HEADS = {
    "timm": (make_timm, "blocks.{}.attn.proj"),
    "hf_vit": (FACTORIES["hf_vit"], "vit.layers.{}.attention.o_proj"),
    # nn.MultiheadAttention applies out_proj's weight itself (no hook runs): its columns are zeroed
    "torchvision": (FACTORIES["torchvision"], "encoder.layers.encoder_layer_{}.self_attention.out_proj.weight"),
    # attention that normalises its merged heads before the projection: the heads are the norm's input
    "timm_scale_norm": (lambda: make_timm(scale_attn_norm=True), "blocks.{}.attn.norm"),
    "eva_sub_ln": (FACTORIES["eva_avg"], "blocks.{}.attn.norm"),
}


def zeroed(model: nn.Module, module_name: str, head: int, heads: int) -> Callable:
    """A pre-hook on ``module_name`` that zeroes head ``head``'s slice of its input (or, for a name
    ending in ``.weight``, that head's columns of the weight, given back on ``remove()``)."""
    if module_name.endswith(".weight"):
        weight = dict(model.named_parameters())[module_name]
        saved = weight.detach().clone()
        width = weight.shape[1] // heads
        with torch.no_grad():
            weight[:, head * width : (head + 1) * width] = 0

        class Restore:
            def remove(self):
                with torch.no_grad():
                    weight.copy_(saved)

        return Restore()

    def hook(module, args):
        merged = args[0].clone()
        width = merged.shape[-1] // heads
        merged[..., head * width : (head + 1) * width] = 0
        return (merged, *args[1:])

    return dict(model.named_modules())[module_name].register_forward_pre_hook(hook)


@pytest.mark.parametrize("name", sorted(MERGED_HEADS))
def test_knockout_switches_off_the_heads_the_modelling_code_merges(name):
    """Switching head ``(l, h)`` off is zeroing its slice where the model merges its heads: before the
    output projection, or before the norm where the attention normalises the merged heads (EVA-02's
    sub-LN), which the capture's head outputs are. Before: heads were zeroed at the output
    projection's input, after that norm, and OpenCLIP and torchvision could not be ablated at all."""
    factory, where = MERGED_HEADS[name]
    model = factory()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    adapter = gmar.get_adapter(model)
    with torch.no_grad():
        logits = adapter.forward(images)
    classes = logits.argmax(dim=1)
    layers, heads = M.head_counts(adapter)
    drops = M.knockout_drops(M.Scorer(model), adapter, images, classes)
    assert drops.shape == (2, layers * heads)
    for layer, head in ((0, 1), (layers - 1, heads - 1)):
        handle = zeroed(model, where.format(layer), head, heads)
        try:
            with torch.no_grad():
                off = adapter.forward(images)
        finally:
            handle.remove()
        expected = logits.softmax(dim=1).gather(1, classes[:, None]) - off.softmax(dim=1).gather(1, classes[:, None])
        assert_close(drops[:, layer * heads + head], expected.squeeze(1), **FLOAT32)
    assert no_hooks(model)


def test_head_ablation_orders_share_endpoints(vit, vit_images):
    adapter = gmar.get_adapter(vit)
    classes = torch.tensor([1, 1])
    forward = torch.arange(12).expand(2, -1)
    _, curve_a = M.head_ablation(M.Scorer(vit), adapter, vit_images, classes, forward)
    _, curve_b = M.head_ablation(M.Scorer(vit), adapter, vit_images, classes, forward.flip(1))
    assert_close(curve_a[:, 0], curve_b[:, 0])
    assert_close(curve_a[:, -1], curve_b[:, -1], **FLOAT32)
    assert not torch.allclose(curve_a[:, 1:-1], curve_b[:, 1:-1])
    assert no_hooks(vit)


def test_head_ablation_does_not_depend_on_the_scorers_batch_size(vit, vit_images):
    """The L*H + 1 ablated copies of an image must each keep their own heads when the scorer splits
    them into several chunks (a ViT-B has 145 > 64 of them)."""
    adapter = gmar.get_adapter(vit)
    classes = torch.tensor([0, 3])
    rankings = M.rank_heads(torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(2)))
    _, whole = M.head_ablation(M.Scorer(vit), adapter, vit_images, classes, rankings)
    _, chunked = M.head_ablation(M.Scorer(vit, batch_size=4), adapter, vit_images, classes, rankings)
    assert_close(chunked, whole, **FLOAT32)


def test_head_ablation_removes_its_hooks_when_the_model_fails(vit, vit_images):
    class Failing(M.Scorer):
        def __call__(self, images, classes):
            self.model(images)  # the masked copies, through the masking capture
            raise RuntimeError("boom")

    adapter = gmar.get_adapter(vit)
    with pytest.raises(RuntimeError, match="boom"):
        M.head_ablation(Failing(vit), adapter, vit_images, torch.tensor([0, 0]), torch.arange(12).expand(2, -1))
    assert no_hooks(vit)


# ---------------------------------------------------------------------------------------- aggregation


def test_mean_ci_by_hand():
    mean, ci = M.mean_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == pytest.approx(2.5)
    assert ci == pytest.approx(1.96 * math.sqrt((5 / 3) / 4))  # sample variance 5/3


def test_mean_ci_drops_nans_and_handles_small_samples():
    mean, ci = M.mean_ci([1.0, float("nan"), 3.0])
    assert mean == pytest.approx(2.0)
    assert ci == pytest.approx(1.96 * math.sqrt(2.0 / 2))
    mean, ci = M.mean_ci([5.0, float("nan")])
    assert mean == 5.0 and math.isnan(ci)
    for empty in ([], [float("nan")]):
        mean, ci = M.mean_ci(empty)
        assert math.isnan(mean) and math.isnan(ci)
    assert M.mean_ci([1.0, 3.0], z=1.0)[1] == pytest.approx(math.sqrt(2.0 / 2))


def test_direction_covers_every_metric():
    expected = {
        "deletion_auc": "lower",
        "insertion_auc": "higher",
        "perturbation_positive": "lower",
        "perturbation_negative": "higher",
        "pointing_game": "higher",
        "energy_pointing_game": "higher",
        "pixel_auroc": "higher",
        "pixel_ap": "higher",
        "segmentation_pixel_accuracy": "higher",
        "segmentation_miou": "higher",
        "class_discrimination": "higher",
        "sanity_spearman": "lower",
        "head_ablation_auc": "lower",
        "removal_own_drops_most": "higher",
        "removal_own_drop": "higher",
        "removal_other_drop": "lower",
    }
    assert expected == M.DIRECTION


def test_direction_covers_the_metrics_the_evaluation_produces():
    from gmar.eval import registry

    used = {name for names in registry.groups().values() for name in names}
    assert used == set(M.DIRECTION) == set(registry.METRICS)


def test_the_shared_vit_is_untouched_by_the_module(vit):
    """The shared module-scoped model must not have been changed by any test above."""
    fresh = make_timm()
    for (name, a), (_, b) in zip(vit.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_class_discrimination_of_a_class_agnostic_map_sums_to_zero_over_three_objects():
    """Three objects of different sizes, one map for every target: the scores cancel exactly."""
    masks = torch.zeros(3, 12, 12, dtype=torch.bool)
    masks[0, 0:3, 0:3] = True
    masks[1, 5:9, 0:6] = True
    masks[2, 8:12, 8:12] = True
    heatmap = torch.rand(12, 12, generator=torch.Generator().manual_seed(4))
    maps = heatmap.expand(3, 12, 12)
    others = torch.stack([masks[[j for j in range(3) if j != t]] for t in range(3)])  # (3, 2, H, W)
    scores = M.class_discrimination(maps, masks, others)
    shares = torch.stack([(heatmap * m).sum() / heatmap.sum() for m in masks])
    expected = torch.stack([shares[t] - shares[[j for j in range(3) if j != t]].mean() for t in range(3)])
    torch.testing.assert_close(scores, expected)
    assert abs(float(scores.sum())) < 1e-6
    # Padding with an empty mask changes nothing.
    padded = torch.cat([others, torch.zeros(3, 1, 12, 12, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(M.class_discrimination(maps, masks, padded), scores)


class PixelLogits(nn.Module):
    """Logit ``c`` is pixel ``(0, 0, c)`` of the image: every drop can be set by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0, :4]


def test_object_removal_against_drops_set_by_hand():
    images = torch.zeros(4, 3, 4, 4)
    removed = torch.zeros(4, 3, 4, 4)
    images[:, 0, 0] = torch.tensor([[5.0, 3.0, 1.0, 0.0], [2.0, 4.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [3, 3, 3, 3]])
    removed[:, 0, 0] = torch.tensor([[1.0, 2.0, 2.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [3, 3, 3, 3]])
    # drops: row 0 [4, 1, -1, 0]; row 1 [1, 4, 0, 1]; row 2 [1, 1, 0, 0]; row 3 all 0
    classes = torch.tensor([0, 0, 0, 1])
    others = [(1, 2), (1,), (0, 1), (0,)]  # row 2 names its own class: ignored
    own, other, most = M.object_removal(M.Scorer(PixelLogits()), images, removed, classes, others)
    assert_close(own, torch.tensor([4.0, 1.0, 1.0, 0.0]))
    assert_close(other, torch.tensor([0.0, 4.0, 1.0, 0.0]))  # row 0: (1 + -1) / 2
    # row 2: a tie with the other class is not "most"; row 3: no drop at all is not either
    assert most.tolist() == [1.0, 0.0, 0.0, 0.0]
    own, other, most = M.object_removal(M.Scorer(PixelLogits()), images[:1], removed[:1], classes[:1], [()])
    assert own.tolist() == [4.0] and math.isnan(other.item()) and math.isnan(most.item())


def test_object_removal_on_a_tiny_vit_against_a_loop(vit):
    """Logits read one image at a time, drops taken by hand, against the batched metric."""
    generator = torch.Generator().manual_seed(3)
    images, removed = torch.rand(5, 3, 32, 32, generator=generator), torch.rand(5, 3, 32, 32, generator=generator)
    classes = torch.tensor([0, 1, 2, 0, 1])
    others = [(1,), (0, 2), (0, 1), (2,), (0, 2)]
    own, other, most = M.object_removal(M.Scorer(vit, batch_size=2), images, removed, classes, others)
    for i in range(5):
        with torch.no_grad():
            drop = (vit(images[i : i + 1]) - vit(removed[i : i + 1]))[0].double()
        rest = [float(drop[c]) for c in others[i] if c != classes[i]]
        assert own[i].item() == pytest.approx(float(drop[classes[i]]), abs=1e-5)
        assert other[i].item() == pytest.approx(sum(rest) / len(rest), abs=1e-5)
        assert most[i].item() == float(float(drop[classes[i]]) > max(rest))
