"""Non-leaking augmentation pipeline (Karras et al., "Training GANs with Limited Data", 2020) as used by EDM.

Every augmentation is applied with probability p times its own multiplier, and its parameters are returned as
augment labels that condition the network (EDM Appendix B.6), so that sampling with zero labels never produces
augmented-looking images. Geometric transformations are composed into one matrix per image and executed once:
reflect padding, 2x upsampling with the sym6 wavelet low-pass filter, bilinear resampling, and 2x filtered
downsampling, which keeps aliasing (a leak of the transform into the images) low.

Random draws (order, shape and distribution) follow NVlabs/edm, so a seeded run draws EDM's augmentations and labels;
the pixels agree with EDM's to the last bits (up to 3.6e-7, also where nothing moved: the 2x upsampling is one
conv_transpose2d where EDM zero-stuffs and convolves).

Persistence constraint: snapshots embed this file's source and EDM's own generate.py executes it when unpickling, so
it imports only numpy, torch, `torch_utils.persistence` and `torch_utils.misc` (`misc.constant` only).
"""

import numpy as np
import torch
import torch.nn.functional as F

from torch_utils import misc, persistence

# Low-pass decomposition filter of the 'sym6' wavelet (PyWavelets `pywt.Wavelet('sym6').dec_lo`); orthonormal, so
# upsampling and downsampling with it round-trip to the identity.
SYM6 = [0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633, 0.4910559419267466,
        0.787641141030194, 0.3379294217276218, -0.07263752278646252, -0.021060292512300564, 0.04472490177066578,
        0.0017677118642428036, -0.007800708325034148]


# ----------------------------------------------------------------------------------------------------------------------
# Batched transformation matrices. Entries are [N] tensors or Python numbers; the result is [N, rows, cols], or a
# cached constant [rows, cols] when no entry is a tensor.

def _stack_matrix(rows, device=None):
    entries = [entry for row in rows for entry in row]
    tensors = [entry for entry in entries if isinstance(entry, torch.Tensor)]
    if not tensors:
        return misc.constant(np.asarray(rows, dtype=np.float32), device=device)
    ref = tensors[0]
    entries = [entry if isinstance(entry, torch.Tensor) else misc.constant(entry, shape=ref.shape, device=ref.device)
               for entry in entries]
    return torch.stack(entries, dim=-1).reshape(*ref.shape, len(rows), len(rows[0]))


def translate2d(tx, ty, device=None):
    return _stack_matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], device=device)


def scale2d(sx, sy, device=None):
    return _stack_matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], device=device)


def rotate2d(theta, device=None):
    """Counter-clockwise rotation by theta (radians) in x-right, y-down pixel coordinates."""
    return _stack_matrix([[torch.cos(theta), torch.sin(-theta), 0],
                          [torch.sin(theta), torch.cos(theta), 0],
                          [0, 0, 1]], device=device)


def translate3d(tx, ty, tz, device=None):
    return _stack_matrix([[1, 0, 0, tx], [0, 1, 0, ty], [0, 0, 1, tz], [0, 0, 0, 1]], device=device)


def scale3d(sx, sy, sz, device=None):
    return _stack_matrix([[sx, 0, 0, 0], [0, sy, 0, 0], [0, 0, sz, 0], [0, 0, 0, 1]], device=device)


def rotate3d(axis, theta, device=None):
    """Rotation by theta about a unit axis (Rodrigues' formula), homogeneous 4x4."""
    vx, vy, vz = axis[..., 0], axis[..., 1], axis[..., 2]
    sin, cos = torch.sin(theta), torch.cos(theta)
    one_minus_cos = 1 - cos
    return _stack_matrix([
        [vx * vx * one_minus_cos + cos, vx * vy * one_minus_cos - vz * sin, vx * vz * one_minus_cos + vy * sin, 0],
        [vy * vx * one_minus_cos + vz * sin, vy * vy * one_minus_cos + cos, vy * vz * one_minus_cos - vx * sin, 0],
        [vz * vx * one_minus_cos - vy * sin, vz * vy * one_minus_cos + vx * sin, vz * vz * one_minus_cos + cos, 0],
        [0, 0, 0, 1]], device=device)


def translate2d_inv(tx, ty, device=None):
    return translate2d(-tx, -ty, device=device)


def scale2d_inv(sx, sy, device=None):
    return scale2d(1 / sx, 1 / sy, device=device)


def rotate2d_inv(theta, device=None):
    return rotate2d(-theta, device=device)


def _gate(values, probability, gate_shape, device):
    """Keep each sample's draw with the given probability, else zero (the draw of the gate follows the values)."""
    keep = torch.rand(gate_shape, device=device) < probability
    return torch.where(keep, values, torch.zeros_like(values))


# ----------------------------------------------------------------------------------------------------------------------

@persistence.persistent_class
class AugmentPipe:
    """Augmentation with labels: `images, augment_labels = pipe(images)`, images [N, C, H, W] float in ~[-1, 1].

    Every multiplier defaults to 0 (off); EDM's train.py uses p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1,
    aniso=1, translate_frac=1, which yields 9 labels: x-flip, y-flip, scale, rotate (cos - 1, sin),
    aniso (w cos r, w sin r), translate (tx, ty).
    """

    def __init__(self, p=1,
                 xflip=0, yflip=0, rotate_int=0, translate_int=0, translate_int_max=0.125,
                 scale=0, rotate_frac=0, aniso=0, translate_frac=0, scale_std=0.2, rotate_frac_max=1, aniso_std=0.2,
                 aniso_rotate_prob=0.5, translate_frac_std=0.125,
                 brightness=0, contrast=0, lumaflip=0, hue=0, saturation=0, brightness_std=0.2, contrast_std=0.5,
                 hue_max=1, saturation_std=1):
        super().__init__()
        self.p = float(p)                                     # Overall multiplier of augmentation probability.

        # Pixel blitting.
        self.xflip = float(xflip)                             # Probability multiplier for x-flip.
        self.yflip = float(yflip)                             # Probability multiplier for y-flip.
        self.rotate_int = float(rotate_int)                   # Probability multiplier for 90-degree rotations.
        self.translate_int = float(translate_int)             # Probability multiplier for integer translation.
        self.translate_int_max = float(translate_int_max)     # Range of integer translation, relative to image size.

        # Geometric transformations.
        self.scale = float(scale)                             # Probability multiplier for isotropic scaling.
        self.rotate_frac = float(rotate_frac)                 # Probability multiplier for arbitrary rotation.
        self.aniso = float(aniso)                             # Probability multiplier for anisotropic scaling.
        self.translate_frac = float(translate_frac)           # Probability multiplier for fractional translation.
        self.scale_std = float(scale_std)                     # Log2 standard deviation of isotropic scaling.
        self.rotate_frac_max = float(rotate_frac_max)         # Range of arbitrary rotation, 1 = full circle.
        self.aniso_std = float(aniso_std)                     # Log2 standard deviation of anisotropic scaling.
        self.aniso_rotate_prob = float(aniso_rotate_prob)     # Probability of anisotropic scaling in a rotated frame.
        self.translate_frac_std = float(translate_frac_std)   # Std of fractional translation, relative to image size.

        # Colour transformations.
        self.brightness = float(brightness)                   # Probability multiplier for brightness.
        self.contrast = float(contrast)                       # Probability multiplier for contrast.
        self.lumaflip = float(lumaflip)                       # Probability multiplier for luma flip.
        self.hue = float(hue)                                 # Probability multiplier for hue rotation.
        self.saturation = float(saturation)                   # Probability multiplier for saturation.
        self.brightness_std = float(brightness_std)           # Standard deviation of brightness.
        self.contrast_std = float(contrast_std)               # Log2 standard deviation of contrast.
        self.hue_max = float(hue_max)                         # Range of hue rotation, 1 = full circle.
        self.saturation_std = float(saturation_std)           # Log2 standard deviation of saturation.

    def __call__(self, images):
        # The loss runs inside the training step's bf16/fp16 autocast; the transform matrices and resampling
        # convolutions would then run in half precision (images that no augmentation moved came back off by up to
        # 0.04, as bf16, on 32x32 images). EDM computes them in float32, and so does this, whatever the autocast.
        with torch.autocast(device_type=images.device.type, enabled=False):
            if images.dtype in (torch.float16, torch.bfloat16):
                images = images.to(torch.float32)
            return self._augment(images)

    def _augment(self, images):
        if images.ndim != 4:
            raise ValueError(f'AugmentPipe: expected images of shape [N, C, H, W], got {list(images.shape)}')
        N, C, H, W = images.shape
        device = images.device
        labels = [torch.zeros([N, 0], device=device)]

        # Pixel blitting: exact permutations of pixels.
        if self.xflip > 0:
            w = torch.randint(2, [N, 1, 1, 1], device=device)
            w = _gate(w, self.xflip * self.p, [N, 1, 1, 1], device)
            images = torch.where(w == 1, images.flip(3), images)
            labels.append(w)

        if self.yflip > 0:
            w = torch.randint(2, [N, 1, 1, 1], device=device)
            w = _gate(w, self.yflip * self.p, [N, 1, 1, 1], device)
            images = torch.where(w == 1, images.flip(2), images)
            labels.append(w)

        if self.rotate_int > 0:
            if H != W:
                raise ValueError(f'AugmentPipe: rotate_int needs square images, got {H}x{W}')
            w = torch.randint(4, [N, 1, 1, 1], device=device)  # Number of quarter turns.
            w = _gate(w, self.rotate_int * self.p, [N, 1, 1, 1], device)
            images = torch.where((w == 1) | (w == 2), images.flip(3), images)
            images = torch.where((w == 2) | (w == 3), images.flip(2), images)
            images = torch.where((w == 1) | (w == 3), images.transpose(2, 3), images)
            labels += [(w == 1) | (w == 2), (w == 2) | (w == 3)]

        if self.translate_int > 0:
            w = torch.rand([2, N, 1, 1, 1], device=device) * 2 - 1
            w = _gate(w, self.translate_int * self.p, [1, N, 1, 1, 1], device)
            tx = w[0].mul(W * self.translate_int_max).round().to(torch.int64)  # [N, 1, 1, 1]
            ty = w[1].mul(H * self.translate_int_max).round().to(torch.int64)
            images = self._translate_integer(images, tx, ty)
            labels += [tx.div(W * self.translate_int_max), ty.div(H * self.translate_int_max)]

        # Parameters of the geometric transformations, composed into G_inv (output pixel -> input pixel,
        # coordinates centred on the image).
        identity_3 = torch.eye(3, device=device)
        G_inv = identity_3

        if self.scale > 0:
            w = torch.randn([N], device=device)
            w = _gate(w, self.scale * self.p, [N], device)
            s = w.mul(self.scale_std).exp2()
            G_inv = G_inv @ scale2d_inv(s, s)
            labels.append(w)

        if self.rotate_frac > 0:
            w = (torch.rand([N], device=device) * 2 - 1) * (np.pi * self.rotate_frac_max)
            w = _gate(w, self.rotate_frac * self.p, [N], device)
            G_inv = G_inv @ rotate2d_inv(-w)
            labels += [w.cos() - 1, w.sin()]

        if self.aniso > 0:
            w = torch.randn([N], device=device)
            r = (torch.rand([N], device=device) * 2 - 1) * np.pi
            w = _gate(w, self.aniso * self.p, [N], device)
            r = _gate(r, self.aniso_rotate_prob, [N], device)
            s = w.mul(self.aniso_std).exp2()
            G_inv = G_inv @ rotate2d_inv(r) @ scale2d_inv(s, 1 / s) @ rotate2d_inv(-r)
            labels += [w * r.cos(), w * r.sin()]

        if self.translate_frac > 0:
            w = torch.randn([2, N], device=device)
            w = _gate(w, self.translate_frac * self.p, [1, N], device)
            tx, ty = w[0].mul(W * self.translate_frac_std), w[1].mul(H * self.translate_frac_std)
            G_inv = G_inv @ translate2d_inv(tx, ty)
            labels += [w[0], w[1]]

        # With p = 0 every draw above is gated off: skip the resampling so that the pipe is an exact identity.
        if G_inv is not identity_3 and self.p > 0:
            images = self._transform_geometric(images, G_inv)

        # Parameters of the colour transformations, composed into one 4x4 matrix M acting on (r, g, b, 1).
        identity_4 = torch.eye(4, device=device)
        M = identity_4
        luma_axis = misc.constant(np.asarray([1, 1, 1, 0]) / np.sqrt(3), device=device)
        luma_proj = torch.outer(luma_axis, luma_axis)

        if self.brightness > 0:
            w = torch.randn([N], device=device)
            w = _gate(w, self.brightness * self.p, [N], device)
            b = w * self.brightness_std
            M = translate3d(b, b, b) @ M
            labels.append(w)

        if self.contrast > 0:
            w = torch.randn([N], device=device)
            w = _gate(w, self.contrast * self.p, [N], device)
            c = w.mul(self.contrast_std).exp2()
            M = scale3d(c, c, c) @ M
            labels.append(w)

        if self.lumaflip > 0:
            w = torch.randint(2, [N, 1, 1], device=device)
            w = _gate(w, self.lumaflip * self.p, [N, 1, 1], device)
            M = (identity_4 - 2 * luma_proj * w) @ M  # Householder reflection of the luma component.
            labels.append(w)

        if self.hue > 0:
            w = (torch.rand([N], device=device) * 2 - 1) * (np.pi * self.hue_max)
            w = _gate(w, self.hue * self.p, [N], device)
            M = rotate3d(luma_axis, w) @ M
            labels += [w.cos() - 1, w.sin()]

        if self.saturation > 0:
            w = torch.randn([N, 1, 1], device=device)
            w = _gate(w, self.saturation * self.p, [N, 1, 1], device)
            M = (luma_proj + (identity_4 - luma_proj) * w.mul(self.saturation_std).exp2()) @ M
            labels.append(w)

        if M is not identity_4 and self.p > 0:
            images = self._transform_color(images, M)

        labels = torch.cat([label.to(torch.float32).reshape(N, -1) for label in labels], dim=1)
        return images, labels

    @staticmethod
    def _translate_integer(images, tx, ty):
        """Shift each image by whole pixels (tx right, ty down per image [N, 1, 1, 1]), reflecting at the borders."""
        N, C, H, W = images.shape
        device = images.device
        # Source index with mirror reflection (period 2W - 2, edge pixels not repeated).
        x = torch.arange(W, device=device).reshape(1, 1, 1, W)
        y = torch.arange(H, device=device).reshape(1, 1, H, 1)
        src_x = W - 1 - (W - 1 - (x - tx) % (W * 2 - 2)).abs()  # [N, 1, 1, W]
        src_y = H - 1 - (H - 1 - (y + ty) % (H * 2 - 2)).abs()  # [N, 1, H, 1]
        images = images.gather(3, src_x.expand(N, C, H, W))
        return images.gather(2, src_y.expand(N, C, H, W))

    @staticmethod
    def _transform_geometric(images, G_inv):
        """Resample images [N, C, H, W] through per-image matrices G_inv [N, 3, 3] without aliasing."""
        N, C, H, W = images.shape
        device = images.device
        taps = np.asarray(SYM6, dtype=np.float32)
        pad_lo = len(taps) // 4  # Extra border (in input pixels) that the downsampling filter reads.
        cx, cy = (W - 1) / 2, (H - 1) / 2

        # Reflect-pad just enough that every output pixel reads real (mirrored) content: the bounding box of the
        # output corners mapped into the input, plus the filter support, clipped to the mirror limit.
        corners = _stack_matrix([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], device=device)
        corners = G_inv @ corners.t()  # [N, xyz, corner]
        extent = corners[:, :2, :].permute(1, 0, 2).flatten(1)  # [xy, N * corner]
        margin = torch.cat([-extent, extent]).max(dim=1).values  # [left, top, right, bottom] reach
        margin = margin + misc.constant([pad_lo * 2 - cx, pad_lo * 2 - cy] * 2, device=device)
        margin = margin.max(misc.constant([0, 0] * 2, device=device))
        margin = margin.min(misc.constant([W - 1, H - 1] * 2, device=device))
        mx0, my0, mx1, my1 = margin.ceil().to(torch.int32).tolist()  # The one host sync: padding needs sizes.
        images = F.pad(input=images, pad=[mx0, mx1, my0, my1], mode='reflect')
        G_inv = translate2d((mx0 - mx1) / 2, (my0 - my1) / 2, device=device) @ G_inv  # Padding moved the centre.

        # Upsample 2x: zero insertion + low-pass, written as a strided transposed convolution per axis.
        channels = images.shape[1]
        kernel = misc.constant(taps, dtype=images.dtype, device=device).reshape(1, 1, 1, -1).tile([channels, 1, 1, 1])
        up_pad = (len(taps) - 2) // 2
        images = F.conv_transpose2d(images, kernel, stride=[1, 2], padding=[0, up_pad], groups=channels)
        images = F.conv_transpose2d(images, kernel.transpose(2, 3), stride=[2, 1], padding=[up_pad, 0],
                                    groups=channels)
        # Upsampled pixel centres sit at 2x - 1/2 in input-pixel coordinates.
        G_inv = scale2d(2, 2, device=device) @ G_inv @ scale2d_inv(2, 2, device=device)
        G_inv = translate2d(-0.5, -0.5, device=device) @ G_inv @ translate2d_inv(-0.5, -0.5, device=device)

        # Bilinear resampling at 2x resolution, with the border the downsampling filter needs. affine_grid works in
        # [-1, 1] coordinates: pixel-centred coordinates times 2 / size (align_corners=False).
        out_shape = [N, C, (H + pad_lo * 2) * 2, (W + pad_lo * 2) * 2]
        G_inv = (scale2d(2 / images.shape[3], 2 / images.shape[2], device=device) @ G_inv
                 @ scale2d_inv(2 / out_shape[3], 2 / out_shape[2], device=device))
        grid = F.affine_grid(theta=G_inv[:, :2, :], size=out_shape, align_corners=False)
        images = F.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)

        # Downsample 2x with the same low-pass filter and crop the border.
        kernel = misc.constant(taps, dtype=images.dtype, device=device).reshape(1, 1, 1, -1).tile([channels, 1, 1, 1])
        down_pad = (len(taps) - 1) // 2
        images = F.conv2d(images, kernel, groups=channels, stride=[1, 2], padding=[0, down_pad])
        images = images[:, :, :, pad_lo:-pad_lo]
        images = F.conv2d(images, kernel.transpose(2, 3), groups=channels, stride=[2, 1], padding=[down_pad, 0])
        return images[:, :, pad_lo:-pad_lo, :]

    @staticmethod
    def _transform_color(images, M):
        """Apply per-image 4x4 colour matrices M [N, 4, 4] to RGB images, or their luma average to grayscale."""
        N, C, H, W = images.shape
        images = images.reshape(N, C, H * W)
        if C == 3:
            images = M[:, :3, :3] @ images + M[:, :3, 3:]
        elif C == 1:
            M = M[:, :3, :].mean(dim=1, keepdim=True)
            images = images * M[:, :, :3].sum(dim=2, keepdim=True) + M[:, :, 3:]
        else:
            raise ValueError(f'AugmentPipe: colour augmentations need RGB (3 channels) or L (1 channel) images, '
                             f'got {C} channels')
        return images.reshape(N, C, H, W)
