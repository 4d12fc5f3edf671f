"""AugmentPipe: label layout and order, exact blits, geometric resampling, colour transforms, identity at p=0."""

import numpy as np
import pytest
import torch

from training.augment import AugmentPipe

EDM_TRAIN = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
ALL_OPS = dict(xflip=1, yflip=1, rotate_int=1, translate_int=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1,
               brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)


def images(n=16, c=3, size=16, seed=0):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def run(pipe, x, seed=1):
    torch.manual_seed(seed)
    return pipe(x)


def test_edm_training_setting_gives_nine_labels_in_edm_order():
    x = images(64)
    out, labels = run(AugmentPipe(p=1, **EDM_TRAIN), x)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert labels.shape == (64, 9) and labels.dtype == torch.float32
    assert set(labels[:, 0].tolist()) == {0.0, 1.0} and set(labels[:, 1].tolist()) == {0.0, 1.0}  # x-, y-flip
    cos_minus_1, sin = labels[:, 3], labels[:, 4]  # rotation angle
    torch.testing.assert_close((cos_minus_1 + 1) ** 2 + sin ** 2, torch.ones(64))
    assert labels[:, 2].std() > 0.5 and labels[:, 7:].std() > 0.5  # scale w and translate (tx, ty) are N(0, 1)
    # At p = 0.12 x-flip still fires with probability 1/2 (its multiplier is 1e8); the others rarely fire.
    _, labels = run(AugmentPipe(p=0.12, **EDM_TRAIN), images(400, size=8))
    assert 0.35 < labels[:, 0].mean() < 0.65
    assert 0.02 < (labels[:, 2] != 0).float().mean() < 0.25 and 0.005 < labels[:, 1].mean() < 0.15


def test_all_operations_label_count():
    _, labels = run(AugmentPipe(p=1, **ALL_OPS), images(4))
    assert labels.shape == (4, 19)
    _, labels = run(AugmentPipe(p=1), images(4))
    assert labels.shape == (4, 0)


def test_xflip_label_equals_flip():
    x = images(32)
    out, labels = run(AugmentPipe(p=1, xflip=1), x)
    assert labels.shape == (32, 1)
    flipped = labels[:, 0] == 1
    assert 0 < flipped.sum() < 32
    assert torch.equal(out[flipped], x[flipped].flip(3)) and torch.equal(out[~flipped], x[~flipped])


def test_yflip_label_equals_flip():
    x = images(32)
    out, labels = run(AugmentPipe(p=1, yflip=1), x)
    flipped = labels[:, 0] == 1
    assert 0 < flipped.sum() < 32
    assert torch.equal(out[flipped], x[flipped].flip(2)) and torch.equal(out[~flipped], x[~flipped])


def test_label_order_follows_the_operations():
    """x-flip comes before brightness: column 0 is the flip, column 1 the brightness draw."""
    x = images(32)
    out, labels = run(AugmentPipe(p=1, xflip=1, brightness=1, brightness_std=0.3), x)
    flipped = labels[:, 0] == 1
    expected = torch.where(flipped[:, None, None, None], x.flip(3), x) + 0.3 * labels[:, 1].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_rotate_int_labels_match_quarter_turns():
    x = images(64)
    out, labels = run(AugmentPipe(p=1, rotate_int=1), x)
    assert labels.shape == (64, 2)
    turns = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}  # EDM's encoding of w = 0..3 quarter turns
    seen = set()
    for i in range(64):
        k = turns[tuple(int(v) for v in labels[i])]
        seen.add(k)
        # w = 1 flips x then transposes, which is torch.rot90 by one step (from the y axis towards the x axis).
        assert torch.equal(out[i], torch.rot90(x[i], k, dims=(1, 2))), (i, k)
    assert seen == {0, 1, 2, 3}


def test_translate_int_shifts_whole_pixels_with_reflection():
    x = images(16, size=16)
    out, labels = run(AugmentPipe(p=1, translate_int=1, translate_int_max=0.125), x)
    tx = torch.round(labels[:, 0] * 2).long()  # label = shift / (16 * 0.125)
    ty = torch.round(labels[:, 1] * 2).long()
    assert (tx.abs() <= 2).all() and (tx != 0).any() and (ty != 0).any()
    idx = np.arange(16)
    for i in range(16):
        # out[y, x] = in[reflect(y + ty), reflect(x - tx)] (reflection without repeating the edge pixel).
        src_x = np.abs(idx - int(tx[i]))
        src_x = np.where(src_x > 15, 30 - src_x, src_x)
        src_y = np.abs(idx + int(ty[i]))
        src_y = np.where(src_y > 15, 30 - src_y, src_y)
        assert torch.equal(out[i], x[i][:, src_y][:, :, src_x]), i


def test_translate_int_rounds_to_the_nearest_pixel():
    """Shift = round(U(-1, 1) * W * 0.125): at W = 16 the shifts -2..2 have probabilities 1/8, 1/4, 1/4, 1/4, 1/8."""
    x = images(4000, c=1, size=16)
    _, labels = run(AugmentPipe(p=1, translate_int=1), x)
    shifts = torch.round(labels[:, :2] * 2).long().flatten()
    freq = torch.stack([(shifts == k).double().mean() for k in range(-2, 3)])
    torch.testing.assert_close(freq, torch.tensor([1 / 8, 1 / 4, 1 / 4, 1 / 4, 1 / 8], dtype=torch.float64),
                               rtol=0, atol=0.02)


def smooth_images(n=4, size=16):
    """Band-limited test images (low frequencies only), so that filtered resampling is near-exact."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing='ij')
    phases = torch.rand(n, 3, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 6.28
    img = torch.sin(2 * np.pi * xx / size + phases[..., 0, None, None]) * torch.cos(
        2 * np.pi * yy / size + phases[..., 1, None, None])
    return img.float()


def test_geometric_identity_round_trips():
    """scale with std 0 runs the whole pad/upsample/resample/downsample chain on identity matrices."""
    x = images(8)
    out, labels = run(AugmentPipe(p=1, scale=1, scale_std=0), x)
    assert labels.shape == (8, 1)
    torch.testing.assert_close(out, x, rtol=0, atol=2e-5)


def test_integer_translation_through_the_geometric_path_is_exact():
    x = images(3)
    G_inv = torch.tensor([[1.0, 0, -1], [0, 1, 0], [0, 0, 1]]).expand(3, 3, 3)  # out(p) = in(p - (1, 0))
    out = AugmentPipe._transform_geometric(x, G_inv)
    assert out.shape == x.shape
    torch.testing.assert_close(out[..., 1:], x[..., :-1], rtol=0, atol=2e-5)  # content moves right by one pixel


@pytest.mark.parametrize('matrix, expected, wrong', [
    ([[-1, 0, 0], [0, -1, 0], [0, 0, 1]], lambda x: x.flip(2, 3), lambda x: x),  # 180-degree rotation
    ([[-1, 0, 0], [0, 1, 0], [0, 0, 1]], lambda x: x.flip(3), lambda x: x.flip(2)),  # mirror in x
    ([[0, -1, 0], [1, 0, 0], [0, 0, 1]], lambda x: torch.rot90(x, 1, dims=(2, 3)),
     lambda x: torch.rot90(x, -1, dims=(2, 3))),  # quarter turn
])
def test_geometric_transform_orientation(matrix, expected, wrong):
    """Orientation conventions of G_inv (output -> input, centred pixel coordinates) on a smooth image.

    Flips and quarter turns through the fractional path are not exact: the 2x-upsampled grid is not symmetric
    about the image centre for the asymmetric sym6 filter, so EDM's pipeline blurs them by ~2% (a shift by whole
    pixels stays exact, see above)."""
    x = smooth_images(size=32)
    G_inv = torch.tensor(matrix, dtype=torch.float32).expand(len(x), 3, 3)
    out = AugmentPipe._transform_geometric(x, G_inv)
    assert (out - expected(x))[..., 2:-2, 2:-2].abs().max() < 0.03
    assert (out - wrong(x)).abs().max() > 0.5


def _analytic(u, v, size):
    """A smooth image as a function of centred pixel coordinates (x right, y down): evaluable anywhere."""
    return torch.sin(2 * np.pi * u / size + 0.7) * torch.cos(2 * np.pi * v / size - 0.4) + 0.3 * torch.sin(
        2 * np.pi * (u + 2 * v) / size + 1.1)


def _rotation(label):
    w = torch.atan2(label[1], label[0] + 1)
    return torch.stack([torch.stack([w.cos(), -w.sin()]), torch.stack([w.sin(), w.cos()])])


@pytest.mark.parametrize('ops, source', [
    # Each: output pixel p (centred) reads the input at A p + t, written from the labels and EDM's formulas
    # (G_inv = scale2d_inv(s, s), rotate2d(w), scale2d_inv(s, 1 / s) at r = 0, translate2d_inv(tx, ty)).
    (dict(scale=1), lambda l, p: p / 2 ** (0.2 * l[0])),
    (dict(rotate_frac=1), lambda l, p: _rotation(l) @ p),
    (dict(aniso=1, aniso_rotate_prob=0),
     lambda l, p: p * torch.stack([2 ** (-0.2 * l[0]), 2 ** (0.2 * l[0])])[:, None]),
    (dict(translate_frac=1), lambda l, p: p - (l[:2] * 32 * 0.125)[:, None]),
])
def test_fractional_geometry_moves_the_pixels_its_labels_state(ops, source):
    """Scale, rotation, anisotropic scaling and fractional translation on a 32x32 image sampled from an analytic
    function: every output pixel whose source lies well inside the image equals the function at the source point
    computed from the labels (the resampling filter's blur is about 2%)."""
    size, n = 32, 8
    centred = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    vv, uu = torch.meshgrid(centred, centred, indexing='ij')
    x = _analytic(uu, vv, size).float().expand(n, 3, size, size).contiguous()
    out, labels = run(AugmentPipe(p=1, **ops), x, seed=4)
    pixels = torch.stack([uu.flatten(), vv.flatten()])  # [2, P]
    checked, largest_move = 0, 0.0
    for i in range(n):
        src = source(labels[i].double(), pixels)
        inside = (src.abs().max(dim=0).values < size / 2 - 4) & (pixels.abs().max(dim=0).values < size / 2 - 4)
        expected = _analytic(src[0], src[1], size)[inside]
        got = out[i, 0].double().flatten()[inside]
        assert (got - expected).abs().max() < 0.05, (ops, i)
        checked += int(inside.sum())
        largest_move = max(largest_move, float((src - pixels)[:, inside].norm(dim=0).max()))
    assert checked > n * 100 and largest_move > 2  # not vacuous: many pixels, moved by pixels


def test_colour_transforms_match_formulas():
    x = images(16)
    out, labels = run(AugmentPipe(p=1, contrast=1, contrast_std=0.5), x)
    torch.testing.assert_close(out, x * torch.exp2(0.5 * labels[:, 0]).reshape(-1, 1, 1, 1), rtol=1e-6, atol=1e-6)

    out, labels = run(AugmentPipe(p=1, lumaflip=1), x)
    flipped = labels[:, 0] == 1
    assert 0 < flipped.sum() < 16
    luma_reflected = x - 2 * x.mean(dim=1, keepdim=True)  # (I - 2 a a^T) x with a = (1, 1, 1) / sqrt(3)
    torch.testing.assert_close(out[flipped], luma_reflected[flipped], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[~flipped], x[~flipped], rtol=0, atol=1e-6)

    for op in ('hue', 'saturation'):
        out, _ = run(AugmentPipe(p=1, **{op: 1}), x)
        torch.testing.assert_close(out.mean(dim=1), x.mean(dim=1), rtol=0, atol=1e-5)  # luma is preserved
        assert (out - x).abs().max() > 0.01
    out, labels = run(AugmentPipe(p=1, hue=1), x)  # rotation about the grey axis preserves the norm
    torch.testing.assert_close(out.norm(dim=1), x.norm(dim=1), rtol=1e-5, atol=1e-5)
    assert labels.shape == (16, 2)
    torch.testing.assert_close((labels[:, 0] + 1) ** 2 + labels[:, 1] ** 2, torch.ones(16))


def test_hue_rotates_by_its_label_angle_about_the_grey_axis_by_rodrigues():
    """Hue: each pixel's (r, g, b) turned by w = atan2(sin, cos) about a = (1, 1, 1) / sqrt(3), right-handed:
    x cos w + (a x x) sin w + a (a . x)(1 - cos w), written out here per pixel."""
    x = images(16)
    out, labels = run(AugmentPipe(p=1, hue=1), x)
    w = torch.atan2(labels[:, 1], labels[:, 0] + 1).double()
    assert w.abs().max() > 1  # large angles are drawn
    a = torch.full([3], 3 ** -0.5, dtype=torch.float64)
    for i in range(16):
        rgb = x[i].double().reshape(3, -1)  # [3, P]
        cross = torch.linalg.cross(a[:, None].expand_as(rgb), rgb, dim=0)
        expected = rgb * w[i].cos() + cross * w[i].sin() + a[:, None] * (a @ rgb)[None] * (1 - w[i].cos())
        torch.testing.assert_close(out[i].double().reshape(3, -1), expected, rtol=0, atol=1e-5)


def test_rotation_and_hue_angles_are_uniform_over_the_full_circle():
    """rotate_frac and hue draw their angle uniformly on [-pi, pi] (rotate_frac_max = hue_max = 1): a tenth of the
    angles lie beyond 0.9 pi in magnitude, half beyond pi / 2."""
    x = images(4000, size=4)
    for op in ('rotate_frac', 'hue'):
        _, labels = run(AugmentPipe(p=1, **{op: 1}), x)
        w = torch.atan2(labels[:, 1], labels[:, 0] + 1).abs()
        assert abs((w > 0.9 * np.pi).double().mean().item() - 0.1) < 0.025, op
        assert abs((w > 0.5 * np.pi).double().mean().item() - 0.5) < 0.04, op


def test_saturation_and_brightness_follow_their_labels_and_default_stds():
    """Saturation scales the chroma (x - luma) by 2^(1 * w); brightness adds 0.2 w; both with EDM's default stds."""
    x = images(16)
    out, labels = run(AugmentPipe(p=1, saturation=1), x)
    luma = x.mean(dim=1, keepdim=True)
    torch.testing.assert_close(out, luma + (x - luma) * torch.exp2(labels[:, 0]).reshape(-1, 1, 1, 1), rtol=0,
                               atol=1e-5)
    out, labels = run(AugmentPipe(p=1, brightness=1), x)
    torch.testing.assert_close(out, x + 0.2 * labels[:, 0].reshape(-1, 1, 1, 1), rtol=0, atol=1e-6)


def test_defaults_are_stylegan2_ada_and_edms():
    """NVlabs/edm training/augment.py (= StyleGAN2-ADA's) constructor defaults."""
    pipe = AugmentPipe()
    expected = dict(p=1, xflip=0, yflip=0, rotate_int=0, translate_int=0, translate_int_max=0.125, scale=0,
                    rotate_frac=0, aniso=0, translate_frac=0, scale_std=0.2, rotate_frac_max=1, aniso_std=0.2,
                    aniso_rotate_prob=0.5, translate_frac_std=0.125, brightness=0, contrast=0, lumaflip=0, hue=0,
                    saturation=0, brightness_std=0.2, contrast_std=0.5, hue_max=1, saturation_std=1)
    assert {k: v for k, v in vars(pipe).items() if not k.startswith('_')} == expected


def test_sym6_is_an_orthonormal_low_pass_filter():
    """The conditions of an orthonormal wavelet low-pass filter, in float64: sum h = sqrt 2, sum h_k h_(k+2m) =
    delta_m (so up- then downsampling is the identity), and the 6 vanishing moments of sym6 (sum (-1)^k k^j h_k = 0
    for j < 6)."""
    from training.augment import SYM6
    h = np.asarray(SYM6, dtype=np.float64)
    assert len(h) == 12
    assert abs(h.sum() - np.sqrt(2)) < 1e-11
    for m in range(6):
        assert abs(np.dot(h[:len(h) - 2 * m], h[2 * m:]) - (m == 0)) < 1e-11, m  # the published digits: ~1e-12
    k = np.arange(12, dtype=np.float64)
    for j in range(6):
        assert abs(np.sum((-1) ** k * k ** j * h)) < 1e-9 * 12 ** j, j


def test_grayscale_images_and_channel_errors():
    x = images(8, c=1)
    out, labels = run(AugmentPipe(p=1, brightness=1, brightness_std=0.2), x)
    torch.testing.assert_close(out, x + 0.2 * labels[:, 0].reshape(-1, 1, 1, 1), rtol=0, atol=1e-6)
    out, _ = run(AugmentPipe(p=1, **EDM_TRAIN), x)
    assert out.shape == x.shape
    with pytest.raises(ValueError, match='got 2 channels'):
        run(AugmentPipe(p=1, contrast=1), images(2, c=2))
    with pytest.raises(ValueError, match=r'\[N, C, H, W\]'):
        AugmentPipe(p=1)(torch.zeros(3, 8, 8))


def test_p_zero_is_identity():
    x = images(8)
    out, labels = run(AugmentPipe(p=0, **ALL_OPS), x)
    assert labels.shape == (8, 19) and torch.all(labels == 0)
    assert torch.equal(out, x)


def test_seeded_runs_repeat_and_rank_streams_differ():
    pipe = AugmentPipe(p=0.5, **ALL_OPS)
    x = images(8)
    first, second, other = run(pipe, x, seed=5), run(pipe, x, seed=5), run(pipe, x, seed=6)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])


def test_attributes_are_python_floats():
    pipe = AugmentPipe(p=np.float64(0.12), **EDM_TRAIN)
    assert all(type(value) is float for key, value in vars(pipe).items() if not key.startswith('_'))
    assert pipe.p == 0.12 and pipe.xflip == 1e8


def test_every_constant_is_made_on_the_images_device(monkeypatch):
    """On CUDA, a constant built on the CPU and multiplied with the per-image matrices stops training with a device
    mismatch (the padding's re-centring translate2d was; found by reading, no GPU here). misc.constant defaults to the
    CPU, so every call during a pass over every operation must name the device: checked by recording the calls."""
    from torch_utils import misc
    calls, constant = [], misc.constant

    def recording_constant(value, shape=None, dtype=None, device=None, memory_format=None):
        calls.append(device)
        return constant(value, shape=shape, dtype=dtype, device=device, memory_format=memory_format)

    monkeypatch.setattr(misc, "constant", recording_constant)
    run(AugmentPipe(p=1, **ALL_OPS), images(4))
    assert calls and all(device is not None for device in calls), calls


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast_does_not_reach_the_augmentation(dtype):
    """Inside the training step's autocast the pipe still computes in float32: the same images, bit for bit, and
    float32 out (CPU autocast lowers the matmuls and convolutions as CUDA's does; before, bf16 came back, off by up to
    0.04 where nothing was augmented)."""
    pipe = AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.manual_seed(0)
    expected, expected_labels = pipe(images)
    torch.manual_seed(0)
    with torch.autocast('cpu', dtype=dtype):
        got, labels = pipe(images)
    assert got.dtype == torch.float32 and torch.equal(got, expected) and torch.equal(labels, expected_labels)
    torch.manual_seed(0)
    half, _ = pipe(images.to(dtype))  # half images in: computed in float32 from them
    torch.manual_seed(0)
    assert half.dtype == torch.float32 and torch.equal(half, pipe(images.to(dtype).float())[0])
