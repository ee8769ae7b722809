"""On-device preprocessing and augmentation (pure JAX, runs inside the jitted steps).

`preprocess` (HU window → [0, 1] → resize to `config.image_size`) is THE input transform: training,
evaluation, the exported SavedModel/TFLite graph and the server all call it, so there is no
train/serve skew. `augment` runs after it in the training step only.

Augmentation draws every parameter per example from one key, each op with its own probability and
range in `config.augment` (see `default_augment_config`). Rotation, scale, translation and crop are
folded into ONE affine resampling per example (bilinear, edges clamped). An op whose probability is
0 is not traced at all, and `config.augment.enabled = False` makes `augment` the identity.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections


def default_preprocess_config() -> ml_collections.ConfigDict:
    """`config.preprocess`: the HU window mapped to [0, 1]."""
    c = ml_collections.ConfigDict()
    # Abdominal soft-tissue window (level 40 HU, width 400 HU): liver, lesions and fat in range.
    c.window_center = 40.0
    c.window_width = 400.0
    return c


def default_augment_config() -> ml_collections.ConfigDict:
    """`config.augment`: each op's probability (per example) and range."""
    c = ml_collections.ConfigDict()
    c.enabled = True
    c.rotation_prob = 0.5
    c.rotation_degrees = 15.0  # uniform in ±
    c.scale_prob = 0.5
    c.scale_range = (0.9, 1.1)  # zoom factor (> 1 zooms in)
    c.translate_prob = 0.5
    c.translate_fraction = 0.08  # uniform shift in ± fraction of the side, per axis
    c.crop_prob = 0.0
    c.crop_fraction = (0.8, 1.0)  # side of a random crop (resized back), as a fraction
    c.noise_prob = 0.3
    c.noise_std = (0.0, 0.03)  # Gaussian noise std, in [0, 1] intensity units
    c.blur_prob = 0.2
    c.blur_sigma = (0.3, 1.0)  # Gaussian blur sigma in pixels
    c.sharpen_prob = 0.2
    c.sharpen_amount = (0.2, 1.0)  # unsharp mask x + a * (x - blur_1px(x))
    c.brightness_prob = 0.3
    c.brightness_delta = 0.05  # added, uniform in ±
    c.contrast_prob = 0.3
    c.contrast_range = (0.85, 1.15)  # around the image mean
    c.gamma_prob = 0.3
    c.gamma_range = (0.85, 1.15)  # x ** gamma
    return c


def window(hu: jax.Array, center: float, width: float) -> jax.Array:
    """Maps [center - width/2, center + width/2] HU to [0, 1] (float32), clipping outside."""
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    x = (hu.astype(jnp.float32) - (center - width / 2)) / width
    return jnp.clip(x, 0.0, 1.0)


def preprocess(hu: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
    """HU (B, H, W, 1) → window → [0, 1] → resized to `config.image_size` when it differs."""
    if hu.ndim != 4 or hu.shape[-1] != 1:
        raise ValueError(f"preprocess expects (batch, height, width, 1) HU, got {hu.shape}")
    x = window(hu, config.preprocess.window_center, config.preprocess.window_width)
    size = config.image_size
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 1), "linear", antialias=True)
    return x


def augment(x: jax.Array, rng: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
    """Random per-example augmentation of (B, H, W, 1) images in [0, 1]; result in [0, 1]."""
    c = config.augment
    if not c.enabled:
        return x
    batch = x.shape[0]
    keys = iter(jax.random.split(rng, 32))

    def draw(prob: float, low: float, high: float, identity: float) -> jax.Array:
        """Per-example parameter: uniform in [low, high] with probability prob, else identity."""
        on = jax.random.uniform(next(keys), (batch,)) < prob
        value = jax.random.uniform(next(keys), (batch,), minval=low, maxval=high)
        return jnp.where(on, value, identity)

    if max(c.rotation_prob, c.scale_prob, c.translate_prob, c.crop_prob) > 0:
        angle = draw(c.rotation_prob, -c.rotation_degrees, c.rotation_degrees, 0.0)
        zoom = draw(c.scale_prob, *c.scale_range, 1.0)
        crop = draw(c.crop_prob, *c.crop_fraction, 1.0)
        t = c.translate_fraction
        shift_y = draw(c.translate_prob, -t, t, 0.0)
        shift_x = draw(c.translate_prob, -t, t, 0.0)
        # A crop of side f at a random place = zoom by 1/f and a shift within the free margin.
        margin = (1.0 - crop) / 2
        shift_y = shift_y + jax.random.uniform(next(keys), (batch,), minval=-1, maxval=1) * margin
        shift_x = shift_x + jax.random.uniform(next(keys), (batch,), minval=-1, maxval=1) * margin
        x = _affine(x, jnp.deg2rad(angle), zoom / crop, shift_y, shift_x)
    if c.blur_prob > 0:
        sigma = draw(c.blur_prob, *c.blur_sigma, 0.0)
        x = _gaussian_blur(x, sigma, radius=math.ceil(3 * c.blur_sigma[1]))
    if c.sharpen_prob > 0:
        amount = draw(c.sharpen_prob, *c.sharpen_amount, 0.0)
        soft = _gaussian_blur(x, jnp.ones((batch,)), radius=3)
        x = x + amount[:, None, None, None] * (x - soft)
    if c.noise_prob > 0:
        std = draw(c.noise_prob, *c.noise_std, 0.0)
        x = x + std[:, None, None, None] * jax.random.normal(next(keys), x.shape)
    if c.brightness_prob > 0:
        delta = draw(c.brightness_prob, -c.brightness_delta, c.brightness_delta, 0.0)
        x = x + delta[:, None, None, None]
    if c.contrast_prob > 0:
        factor = draw(c.contrast_prob, *c.contrast_range, 1.0)[:, None, None, None]
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * factor + mean
    if c.gamma_prob > 0:
        gamma = draw(c.gamma_prob, *c.gamma_range, 1.0)[:, None, None, None]
        x = jnp.clip(x, 0.0, 1.0) ** gamma
    return jnp.clip(x, 0.0, 1.0)


def _affine(
    x: jax.Array, angle: jax.Array, zoom: jax.Array, shift_y: jax.Array, shift_x: jax.Array
) -> jax.Array:
    """Rotates by angle (radians), zooms and shifts (fractions of the side) about the centre."""
    _, h, w, _ = x.shape
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                          indexing="ij")  # fmt: skip
    cy, cx = (h - 1) / 2, (w - 1) / 2

    def one(image, a, z, ty, tx):
        # Output pixel → source coordinate: inverse rotation and zoom about the centre, then shift.
        cos, sin = jnp.cos(a) / z, jnp.sin(a) / z
        dy, dx = ys - cy, xs - cx
        src_y = cos * dy - sin * dx + cy - ty * h
        src_x = sin * dy + cos * dx + cx - tx * w
        return _bilinear(image[..., 0], src_y, src_x)[..., None]

    return jax.vmap(one)(x, angle, zoom, shift_y, shift_x)


def _bilinear(image: jax.Array, y: jax.Array, x: jax.Array) -> jax.Array:
    """Samples image at (y, x) bilinearly, clamping to the edge."""
    h, w = image.shape
    y = jnp.clip(y, 0, h - 1)
    x = jnp.clip(x, 0, w - 1)
    y0 = jnp.floor(y)
    x0 = jnp.floor(x)
    fy, fx = y - y0, x - x0
    y0i, x0i = y0.astype(jnp.int32), x0.astype(jnp.int32)
    y1i, x1i = jnp.minimum(y0i + 1, h - 1), jnp.minimum(x0i + 1, w - 1)
    top = image[y0i, x0i] * (1 - fx) + image[y0i, x1i] * fx
    bottom = image[y1i, x0i] * (1 - fx) + image[y1i, x1i] * fx
    return top * (1 - fy) + bottom * fy


def _gaussian_blur(x: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
    """Separable Gaussian blur with a per-example sigma (0 = unchanged), edges replicated."""
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    safe = jnp.maximum(sigma, 1e-6)[:, None]
    kernel = jnp.exp(-0.5 * (offsets[None, :] / safe) ** 2)
    kernel = kernel / kernel.sum(axis=1, keepdims=True)  # sigma→0: a delta at the centre
    kernel = kernel[:, :, None, None, None]  # (B, taps, 1, 1, 1)
    padded = jnp.pad(x, ((0, 0), (radius, radius), (0, 0), (0, 0)), mode="edge")
    x = sum(kernel[:, i] * padded[:, i : i + x.shape[1]] for i in range(2 * radius + 1))
    padded = jnp.pad(x, ((0, 0), (0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(kernel[:, i] * padded[:, :, i : i + x.shape[2]] for i in range(2 * radius + 1))
