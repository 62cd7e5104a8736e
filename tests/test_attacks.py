"""The attacks: their registry (README, flags) and pure image functions: pixel-exact
triggers, WaNet warps, PGD, SIG and adaptive blend's pieces."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from asd_ray.attacks import ATTACKS, PARAMS
from asd_ray.attacks.adaptive_blend import apply_pieces, draw_pieces, piece_index
from asd_ray.attacks.badnets import BADNETS_32PX_PATCH, badnets_trigger, white_square_pattern
from asd_ray.attacks.blend import blend_trigger
from asd_ray.attacks.clean_label import pgd_perturb
from asd_ray.attacks.sig import add_signal, sig_signal
from asd_ray.attacks.trigger import Trigger, apply_trigger, load_pattern, to_channels
from asd_ray.attacks.triggers import checkerboard_corners_trigger
from asd_ray.attacks.wanet import apply_wanet, wanet_grid

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_registered_attack_has_a_row_in_the_readme_attack_table():
    section = README.read_text().split("### Attacks and ground truth", 1)[1].split("\n### ", 1)[0]
    rows = re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE)
    assert rows == list(ATTACKS), "README's attack table: one row per registered attack, in its order"


def test_every_attack_parameter_is_a_flag_of_asd_ray_poison_unless_api_only(capsys):
    from asd_ray.cli import main

    with pytest.raises(SystemExit):
        main(["poison", "--help"])
    shown = set(re.findall(r"--[a-z][a-z-]*", capsys.readouterr().out))
    for param in PARAMS:
        flag = f"--no-{param.flag_name[2:]}" if param.type is bool else param.flag_name
        assert (flag in shown) == param.flag, flag


def _images(n: int, size: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def _changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels that differ in any image or channel."""
    return (before != after).any(axis=(0, 3))


# ---- BadNets ---------------------------------------------------------------------------


def test_badnets_32px_patch_is_pixel_exact_and_nothing_else_changes():
    images = _images(4, 32)
    out = apply_trigger(images, badnets_trigger(32, 32, 3))
    assert out.dtype == np.uint8 and out.shape == images.shape
    expected = {
        (4, 4): (180, 249, 112),
        (4, 5): (155, 50, 126),
        (5, 4): (234, 82, 68),
        (5, 5): (187, 201, 219),
    }
    for (row, col), rgb in expected.items():
        assert (out[:, row, col] == rgb).all()
    mask = np.ones((32, 32), bool)
    mask[4:6, 4:6] = False
    assert (out[:, mask] == images[:, mask]).all()
    assert (BADNETS_32PX_PATCH[0, 1] == (155, 50, 126)).all()


def test_badnets_grayscale_uses_rounded_luminance():
    out = apply_trigger(_images(2, 28, channels=1), badnets_trigger(28, 28, 1))
    for (row, col), (r, g, b) in {(4, 4): (180, 249, 112), (5, 5): (187, 201, 219)}.items():
        assert (out[:, row, col, 0] == round(0.299 * r + 0.587 * g + 0.114 * b)).all()
    assert (out[:, 4, 4, 0] == 213).all()  # 53.82 + 146.163 + 12.768 = 212.751


def test_badnets_224px_default_is_seeded_32px_noise_in_upper_left():
    images = _images(2, 224)
    trigger = badnets_trigger(224, 224, 3, seed=5)
    out = apply_trigger(images, trigger)
    changed = _changed(images, out)
    assert changed[:32, :32].mean() > 0.9 and not changed[32:].any() and not changed[:, 32:].any()
    expected = np.random.default_rng(5).integers(0, 256, (32, 32, 3))
    assert (out[:, :32, :32] == expected).all()
    same = badnets_trigger(224, 224, 3, seed=5).pattern
    other = badnets_trigger(224, 224, 3, seed=6).pattern
    assert np.array_equal(trigger.pattern, same) and not np.array_equal(trigger.pattern, other)


def test_badnets_custom_location_size_and_white_square():
    images = _images(3, 32)
    out = apply_trigger(
        images, badnets_trigger(32, 32, 3, pattern=white_square_pattern(3), location=(29, 29))
    )
    assert (out[:, 29:, 29:] == 255).all()
    assert not _changed(images, out)[:29].any() and not _changed(images, out)[:, :29].any()

    trigger = badnets_trigger(32, 32, 3, location=(10, 20), size=4)  # 2x2 patch, nearest -> 4x4
    out = apply_trigger(images, trigger)
    assert (out[:, 10:12, 20:22] == BADNETS_32PX_PATCH[0, 0]).all()
    assert (out[:, 12:14, 22:24] == BADNETS_32PX_PATCH[1, 1]).all()
    assert trigger.weight.sum() == 16 and trigger.weight[10:14, 20:24].all()


@pytest.mark.parametrize(
    "kwargs",
    [{"location": (31, 0)}, {"location": (-1, 4)}, {"location": (0, 0), "size": 33}, {"size": 0}],
)
def test_badnets_out_of_bounds_raises(kwargs):
    with pytest.raises(ValueError, match="location|size"):
        badnets_trigger(32, 32, 3, **kwargs)


def test_apply_trigger_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(2, 28, 28, 3\).*\(32, 32, 3\)"):
        apply_trigger(_images(2, 28), badnets_trigger(32, 32, 3))


# ---- Blend and shared helpers ----------------------------------------------------------


def test_blend_matches_hand_computation():
    images = _images(2, 32, seed=1)
    trigger = blend_trigger(32, 32, 3, alpha=0.1, seed=3)
    pattern = np.random.default_rng(3).integers(0, 256, (32, 32, 3))
    assert np.array_equal(trigger.pattern, pattern)
    out = apply_trigger(images, trigger)
    for n, row, col, c in [(0, 0, 0, 0), (1, 17, 5, 2), (0, 31, 31, 1), (1, 8, 30, 0)]:
        x, p = int(images[n, row, col, c]), int(pattern[row, col, c])
        assert abs(int(out[n, row, col, c]) - (0.9 * x + 0.1 * p)) <= 0.5 + 1e-4


def test_blend_constant_pattern_and_seeds():
    images = np.full((1, 8, 8, 3), 100, np.uint8)
    out = apply_trigger(images, blend_trigger(8, 8, 3, alpha=0.25, pattern=np.full((4, 4, 3), 200.0)))
    assert (out == 125).all()  # 0.75*100 + 0.25*200, pattern resized 4 -> 8
    a, b = blend_trigger(16, 16, 1, seed=0), blend_trigger(16, 16, 1, seed=1)
    assert a.pattern.shape == (16, 16, 1) and not np.array_equal(a.pattern, b.pattern)
    assert np.array_equal(a.pattern, blend_trigger(16, 16, 1, seed=0).pattern)


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5])
def test_blend_alpha_out_of_range_raises(alpha):
    with pytest.raises(ValueError, match="alpha"):
        blend_trigger(32, 32, 3, alpha=alpha)


def test_to_channels_and_load_pattern(tmp_path):
    rgb = np.array([[[255, 0, 0], [0, 0, 255]]], np.float32)
    assert np.allclose(to_channels(rgb, 1)[..., 0], [[76.245, 29.07]])
    assert to_channels(rgb, 3) is not rgb and np.array_equal(to_channels(rgb, 3), rgb)
    picture = np.zeros((16, 16, 3), np.uint8)
    picture[:8, :8] = (10, 20, 30)
    Image.fromarray(picture).save(tmp_path / "p.png")
    small = load_pattern(tmp_path / "p.png", 2, 2, 3)  # nearest: exact colours
    assert small.dtype == np.float32 and small.shape == (2, 2, 3)
    assert np.array_equal(small[0, 0], [10, 20, 30]) and np.array_equal(small[1, 1], [0, 0, 0])
    assert load_pattern(tmp_path / "p.png", 32, 32, 1).shape == (32, 32, 1)


def test_weight_one_reproduces_pattern_exactly():
    pattern = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.float32)
    trigger = Trigger(pattern=pattern, weight=np.ones((8, 8, 1), np.float32))
    assert np.array_equal(apply_trigger(_images(3, 8), trigger), np.broadcast_to(pattern, (3, 8, 8, 3)))


def test_checkerboard_in_four_corners():
    images = _images(2, 32)
    out = apply_trigger(images, checkerboard_corners_trigger(32, 32, 3))
    board = np.array([[255, 0, 255], [0, 255, 0], [255, 0, 255]])
    for rows in (slice(0, 3), slice(29, 32)):
        for cols in (slice(0, 3), slice(29, 32)):
            assert (out[:, rows, cols] == board[None, :, :, None]).all()
    changed = _changed(images, out)
    assert changed.sum() <= 36 and not changed[3:29].any() and not changed[:, 3:29].any()
    with pytest.raises(ValueError, match="size"):
        checkerboard_corners_trigger(4, 4, 3, size=3)


# ---- WaNet -----------------------------------------------------------------------------


def test_wanet_grid_shape_range_and_determinism():
    grid = wanet_grid(32, seed=1)
    assert grid.shape == (1, 32, 32, 2) and grid.dtype == torch.float32
    assert grid.min() >= -1 and grid.max() <= 1
    assert torch.equal(grid, wanet_grid(32, seed=1)) and not torch.equal(grid, wanet_grid(32, seed=2))
    identity = wanet_grid(32, s=0.0)
    assert torch.allclose(identity[0, 0, :, 0], torch.linspace(-1, 1, 32))  # x varies along columns
    assert torch.allclose(identity[0, :, 0, 1], torch.linspace(-1, 1, 32))


def test_wanet_identity_warp_keeps_images():
    images = _images(3, 32)
    out = apply_wanet(images, wanet_grid(32, s=0.0))
    assert np.abs(out.astype(int) - images).max() <= 1


def test_wanet_warp_is_deterministic_and_noise_mode_differs_per_image():
    images = np.repeat(_images(1, 32), 4, axis=0)
    grid = wanet_grid(32, seed=0)
    warped = apply_wanet(images, grid)
    assert np.array_equal(warped, apply_wanet(images, grid)) and not np.array_equal(warped, images)
    noisy = apply_wanet(images, grid, noise_rng=np.random.default_rng(0))
    assert np.array_equal(noisy, apply_wanet(images, grid, noise_rng=np.random.default_rng(0)))
    assert not np.array_equal(noisy[0], noisy[1]) and not np.array_equal(noisy[0], warped[0])


def test_wanet_rejects_non_square_and_mismatched_grid():
    with pytest.raises(ValueError, match="square"):
        apply_wanet(np.zeros((1, 32, 16, 3), np.uint8), wanet_grid(32))
    with pytest.raises(ValueError, match="wanet_grid"):
        apply_wanet(_images(1, 16), wanet_grid(32))


# ---- PGD -------------------------------------------------------------------------------


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)  # test-only: fixes the tiny surrogate's initial weights
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 3),
    )


def _loss(model, images, labels, mean, std):
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(x), torch.from_numpy(labels)).item()


def test_pgd_stays_in_eps_ball_raises_loss_and_leaves_model_alone():
    model = _tiny_model().train()
    images, labels = _images(12, 16, seed=2), np.arange(12) % 3
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eps = 8 / 255
    out = pgd_perturb(
        model,
        images,
        labels,
        eps=eps,
        step=2 / 255,
        steps=10,
        mean=mean,
        std=std,
        batch_size=5,
        seed=0,
    )
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert np.abs(out.astype(int) - images).max() <= math.ceil(eps * 255) + 1
    assert not np.array_equal(out, images)
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    model.eval()
    assert _loss(model, out, labels, mean, std) > _loss(model, images, labels, mean, std) + 0.01
    again = pgd_perturb(
        model,
        images,
        labels,
        eps=eps,
        step=2 / 255,
        steps=10,
        mean=mean,
        std=std,
        batch_size=5,
        seed=0,
    )
    assert np.array_equal(out, again)


def test_pgd_validates_arguments():
    model, images = _tiny_model(), _images(2, 8)
    with pytest.raises(ValueError, match="labels"):
        pgd_perturb(model, images, np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="mean and std"):
        pgd_perturb(model, images, np.zeros(2, np.int64), mean=(0.5, 0.5, 0.5))


# ---- SIG -------------------------------------------------------------------------------


def test_sig_signal_values_by_hand():
    # 12 px wide, 2 periods: 20 sin(60 j degrees) = 0, 17.32, 17.32, 0, -17.32, -17.32, ...
    signal = sig_signal(3, 12, 2, delta=20, frequency=2)
    assert signal.shape == (3, 12, 2) and signal.dtype == np.float32
    assert np.allclose(signal[1, :3, 1], [0, 17.3205, 17.3205], atol=1e-3)
    assert (signal == signal[:1, :, :1]).all()  # constant down each column and across channels
    zero = add_signal(np.zeros((1, 3, 12, 2), np.uint8), signal)
    grey = add_signal(np.full((1, 3, 12, 2), 128, np.uint8), signal)
    white = add_signal(np.full((1, 3, 12, 2), 255, np.uint8), signal)
    assert (zero[0, :, :, 0] == [0, 17, 17, 0, 0, 0, 0, 17, 17, 0, 0, 0]).all()  # negatives clip at 0
    assert (grey[0, :, :, 1] == [128, 145, 145, 128, 111, 111, 128, 145, 145, 128, 111, 111]).all()
    assert (white[0, :, :, 0] == [255, 255, 255, 255, 238, 238, 255, 255, 255, 255, 238, 238]).all()


def test_sig_defaults_are_delta_20_and_6_periods():
    signal = sig_signal(28, 28, 1)
    j = np.arange(28)
    assert np.allclose(signal[5, :, 0], 20 * np.sin(2 * np.pi * 6 * j / 28), atol=1e-4)


@pytest.mark.parametrize("frequency", [6.0, 7.5, 0.0])
def test_sig_frequency_must_stay_below_half_the_width(frequency):
    with pytest.raises(ValueError, match=r"--sig-frequency .* must be in \(0, 6\)"):
        sig_signal(12, 12, 3, frequency=frequency)


def test_add_signal_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="height, width, channels"):
        add_signal(_images(1, 16), sig_signal(16, 16, 1))


# ---- Adaptive blend --------------------------------------------------------------------


def test_draw_pieces_keeps_exactly_the_configured_count_uniformly():
    kept = draw_pieces(np.random.default_rng(0), 4000, grid=4, pieces=5)
    assert kept.shape == (4000, 16) and kept.dtype == bool and (kept.sum(axis=1) == 5).all()
    share = kept.mean(axis=0)  # 5/16 = 0.3125 per piece; 4 standard deviations: 0.029
    assert (np.abs(share - 5 / 16) < 0.03).all()
    assert len({row.tobytes() for row in kept[:50]}) > 45  # a draw per image, not one mask
    again = draw_pieces(np.random.default_rng(0), 4000, grid=4, pieces=5)
    assert np.array_equal(kept, again)
    assert (draw_pieces(np.random.default_rng(1), 3, grid=3, pieces=9)).all()
    with pytest.raises(ValueError, match="--adaptive-pieces 17 must be in 1..16"):
        draw_pieces(np.random.default_rng(0), 1, grid=4, pieces=17)


def test_piece_index_tiles_the_image():
    cells = piece_index(28, 28, 4)  # 7x7 px pieces
    assert (cells[:7, :7] == 0).all() and (cells[:7, 7:14] == 1).all() and (cells[7:14, :7] == 4).all()
    assert (cells[21:, 21:] == 15).all() and (np.bincount(cells.ravel()) == 49).all()
    odd = piece_index(10, 6, 4)  # rows 3, 2, 3, 2 (y * 4 // 10); columns 2, 1, 2, 1
    assert np.array_equal(np.bincount(odd.ravel()).reshape(4, 4), np.outer([3, 2, 3, 2], [2, 1, 2, 1]))
    with pytest.raises(ValueError, match="--adaptive-grid 5 is larger than these 4x8 images"):
        piece_index(4, 8, 5)


def test_apply_pieces_blends_only_the_kept_pieces_at_the_trigger_alpha():
    images = _images(2, 16, seed=4)
    trigger = blend_trigger(16, 16, 3, alpha=0.15, seed=2)
    full = apply_trigger(images, trigger)  # the whole pattern at alpha 0.15
    kept = np.zeros((2, 4), bool)  # 2x2 grid of 8x8 pieces
    kept[0, [0, 3]] = True  # upper-left and lower-right
    kept[1, 1] = True  # upper-right only
    out = apply_pieces(images, trigger, kept, piece_index(16, 16, 2))
    inside = np.zeros((2, 16, 16), bool)
    inside[0, :8, :8] = inside[0, 8:, 8:] = inside[1, :8, 8:] = True
    assert np.array_equal(out[inside], full[inside]) and np.array_equal(out[~inside], images[~inside])
    changed = (out != images).any(axis=3)
    assert changed[inside].mean() > 0.9  # 0.15 |p - x| rounds to a change on almost every pixel
    p, x = trigger.pattern[0, 0, 0], int(images[0, 0, 0, 0])
    assert abs(int(out[0, 0, 0, 0]) - (0.85 * x + 0.15 * p)) <= 0.5 + 1e-4
    with pytest.raises(ValueError, match="one row per image"):
        apply_pieces(images, trigger, kept[:1], piece_index(16, 16, 2))
