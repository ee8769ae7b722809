"""On-device preprocessing (HU window, resize) and augmentation, pure JAX, inside the jitted step.

`preprocess` is the one function from stored HU to network input: training, evaluation, export
(jax2tf: static shapes except batch, only ops that TFLite's StableHLO path converts) and serving
all call it. `augment` runs after it, in training only.

`config.preprocess` fields (see `default_preprocess_config()`):
  window_center  float  HU at the middle of the display window (0.5 after windowing)
  window_width   float  HU span of the window, > 0; below it maps to 0, above it to 1

`config.augment` fields (see `default_augment_config()`); each op draws, per example, whether it
runs (with probability `prob`) and its parameter uniformly from `range = (lo, hi)`:
  enabled     bool   master switch; False makes `augment` the identity (evaluation, export)
  fill_value  float  value in [0, 1] of pixels sampled from outside the image (0: the window's
                     lower end, air for soft-tissue windows)
  rotate      prob, range  angle in degrees, counter-clockwise
  scale       prob, range  zoom factor (> 1 enlarges the content), about the image centre
  translate   prob, range  shift as a fraction of the image side, drawn for rows and columns
  crop        prob, range  side of a random crop as a fraction of the image side, in (0, 1],
                           resized back to the full image
  blur        prob, range  Gaussian blur sigma in pixels, > 0 (separable; radius from the top
                           of the range times BLUR_TRUNCATE)
  sharpen     prob, range, sigma  unsharp-mask amount (x + amount * (x - blur_sigma(x))), >= 0
  brightness  prob, range  value added
  contrast    prob, range  factor about the image mean, >= 0
  gamma       prob, range  exponent of x ** gamma, > 0
  noise       prob, range  standard deviation of added Gaussian noise, >= 0
Rotation, scale, translation and crop compose into ONE bilinear resampling per example. The
intensity ops run in the order blur, sharpen, brightness, contrast, gamma, noise, each clipped
to [0, 1]. An op with prob 0 is not even traced.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

# A Gaussian kernel is cut at this many sigmas (scipy.ndimage's default truncate=4 keeps 99.99%;
# 3 keeps 99.7% of the mass with a third fewer taps).
BLUR_TRUNCATE = 3.0

GEOMETRIC = ("rotate", "scale", "translate", "crop")
INTENSITY = ("blur", "sharpen", "brightness", "contrast", "gamma", "noise")
OPS = GEOMETRIC + INTENSITY


def default_preprocess_config() -> ml_collections.ConfigDict:
    """`config.preprocess`: the HU window that maps to [0, 1]."""
    # Abdominal soft-tissue window (level 40 HU, width 400 HU): liver, lesions and fat in range.
    return ml_collections.ConfigDict({"window_center": 40.0, "window_width": 400.0})


def default_augment_config() -> ml_collections.ConfigDict:
    """`config.augment`: mild augmentations for CT slices (see the module docstring)."""

    def op(prob: float, lo: float, hi: float, **extra: float) -> dict:
        return {"prob": prob, "range": (lo, hi), **extra}

    return ml_collections.ConfigDict(
        {
            "enabled": True,
            "fill_value": 0.0,
            "rotate": op(0.5, -15.0, 15.0),
            "scale": op(0.5, 0.9, 1.1),
            "translate": op(0.5, -0.1, 0.1),
            "crop": op(0.3, 0.8, 1.0),
            "blur": op(0.2, 0.1, 1.0),
            "sharpen": op(0.2, 0.2, 1.0, sigma=1.0),
            "brightness": op(0.5, -0.1, 0.1),
            "contrast": op(0.5, 0.8, 1.2),
            "gamma": op(0.5, 0.8, 1.25),
            "noise": op(0.3, 0.0, 0.03),
        }
    )


# ---------------------------------------------------------------------------------------------
# Preprocessing: the same for training, evaluation, export and serving.


def window(hu: jax.Array, center: float, width: float) -> jax.Array:
    """Map HU to float32 [0, 1]: center - width/2 -> 0, center + width/2 -> 1, clipped."""
    if not width > 0:
        raise ValueError(f"window width must be > 0 HU, got {width!r}")
    lo = center - width / 2.0
    return jnp.clip((jnp.asarray(hu, jnp.float32) - lo) / width, 0.0, 1.0)


def preprocess(hu: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
    """HU (B, H, W, 1), any dtype -> windowed float32 (B, S, S, 1) in [0, 1], S = image_size.

    Float HU are first rounded to the nearest integer (half to even) and clipped to int16, as
    `dicom.to_int16` makes the records."""
    if hu.ndim != 4 or hu.shape[-1] != 1:
        raise ValueError(f"preprocess expects HU images of shape (B, H, W, 1), got {hu.shape}")
    if hu.shape[1] != hu.shape[2]:
        raise ValueError(
            f"preprocess expects square images, got {hu.shape[1]}x{hu.shape[2]}; "
            f"pad them to square first (liverjax.dicom.resample does)"
        )
    if jnp.issubdtype(hu.dtype, jnp.floating):
        # As the records hold them (`dicom.to_int16`): a float image fed to the exported or the
        # served model scores as `liverjax.predict` and the dataset build score it. A no-op on
        # the int16 records themselves.
        info = jnp.iinfo(jnp.int16)
        hu = jnp.clip(jnp.round(hu), info.min, info.max)
    x = window(hu, config.preprocess.window_center, config.preprocess.window_width)
    size = config.image_size
    if hu.shape[1] != size:
        x = jax.image.resize(x, (x.shape[0], size, size, 1), method="linear", antialias=True)
        x = jnp.clip(x, 0.0, 1.0)  # the antialiasing kernel's float error can step outside
    return x


# ---------------------------------------------------------------------------------------------
# Augmentation (training only).


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Check `config.image_size`, `config.preprocess` and `config.augment` (call at start-up)."""
    for key in ("image_size", "preprocess", "augment"):
        if key not in config:
            raise ValueError(
                f"config has no '{key}'; see liverjax.preprocess.default_preprocess_config() "
                f"and default_augment_config()"
            )
    if not isinstance(config.image_size, int) or config.image_size < 1:
        raise ValueError(f"config.image_size = {config.image_size!r}: must be a positive int")
    width = config.preprocess.window_width
    if not width > 0:
        raise ValueError(f"config.preprocess.window_width = {width!r}: must be > 0 HU, e.g. 400")
    validate_augment_config(config.augment)


def validate_augment_config(aug: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the key if `config.augment` holds an unknown op or a bad value."""
    known = set(OPS) | {"enabled", "fill_value"}
    unknown = sorted(set(aug.keys()) - known)
    if unknown:
        raise ValueError(f"config.augment has unknown field(s) {unknown}; known: {sorted(known)}")
    fill = aug.get("fill_value", 0.0)
    if not (isinstance(fill, int | float) and not isinstance(fill, bool) and 0.0 <= fill <= 1.0):
        raise ValueError(
            f"config.augment.fill_value = {fill!r}: must be in [0, 1], the windowed range (0: the "
            "window's lower end, air for soft-tissue windows)"
        )
    for name in OPS:
        if name not in aug:
            raise ValueError(
                f"config.augment.{name} is missing; start from "
                f"liverjax.preprocess.default_augment_config()"
            )
        op = aug[name]
        where = f"config.augment.{name}"
        if not 0.0 <= op.prob <= 1.0:
            raise ValueError(f"{where}.prob = {op.prob!r}: must be in [0, 1]")
        if len(op.range) != 2 or not op.range[0] <= op.range[1]:
            raise ValueError(f"{where}.range = {op.range!r}: must be (lo, hi) with lo <= hi")
    # (op, lowest allowed value of its range, whether that value itself is allowed)
    bounds = [
        ("scale", 0.0, False),
        ("crop", 0.0, False),
        ("blur", 0.0, False),
        ("gamma", 0.0, False),
        ("sharpen", 0.0, True),
        ("contrast", 0.0, True),
        ("noise", 0.0, True),
    ]
    for name, bound, inclusive in bounds:
        lo = aug[name].range[0]
        if not (lo >= bound if inclusive else lo > bound):
            raise ValueError(
                f"config.augment.{name}.range = {aug[name].range!r}: values must be "
                f"{'>=' if inclusive else '>'} {bound}"
            )
    if aug.crop.range[1] > 1.0:
        raise ValueError(
            f"config.augment.crop.range = {aug.crop.range!r}: a crop side is a fraction of the "
            f"image side, at most 1"
        )
    if not aug.sharpen.get("sigma", 0.0) > 0.0:
        raise ValueError(
            f"config.augment.sharpen.sigma = {aug.sharpen.get('sigma')!r}: must be > 0 pixels"
        )


# Per example, each op reads 1 + _DRAWS[op] uniform numbers from its slots: its on/off draw,
# then its parameter, or two (rows, columns) for the translation, or three for the crop (side,
# then the window's corner in rows and columns).
_DRAWS = {name: {"translate": 2, "crop": 3}.get(name, 1) for name in OPS}
_STARTS = tuple(itertools.accumulate((1 + _DRAWS[n] for n in OPS), initial=0))
_SLOTS = dict(zip(OPS, _STARTS[:-1], strict=True))
_N_SLOTS = _STARTS[-1]


class _Draws:
    """One example's uniform numbers in [0, 1), read by op name."""

    def __init__(self, u: jax.Array, aug: ml_collections.ConfigDict):
        self.u, self.aug = u, aug

    def on(self, name: str) -> jax.Array:
        """Whether the op runs on this example (probability `prob`)."""
        return self.u[_SLOTS[name]] < self.aug[name].prob

    def value(self, name: str, i: int = 0) -> jax.Array:
        """The op's i-th parameter, uniform in its `range`."""
        lo, hi = self.aug[name].range
        return lo + (hi - lo) * self.extra(name, i)

    def extra(self, name: str, i: int) -> jax.Array:
        """The op's i-th uniform number in [0, 1)."""
        return self.u[_SLOTS[name] + 1 + i]


def _gaussian_taps(sigma: jax.Array, radius: int) -> jax.Array:
    """Normalised 1-D Gaussian weights at offsets -radius..radius for a traced sigma."""
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    taps = jnp.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


def _blur(img: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
    """Separable Gaussian blur of one (H, W) image, reflected edges; sigma traced, radius static."""
    taps = _gaussian_taps(sigma, radius)
    h, w = img.shape
    p = jnp.pad(img, radius, mode="reflect" if min(h, w) > radius else "edge")
    rows = sum(taps[k] * p[k : k + h, :] for k in range(2 * radius + 1))
    return sum(taps[k] * rows[:, k : k + w] for k in range(2 * radius + 1))


def _radius(sigma: float) -> int:
    return max(1, math.ceil(BLUR_TRUNCATE * sigma))


def _bilinear(img: jax.Array, rows: jax.Array, cols: jax.Array, fill: float) -> jax.Array:
    """Sample one (H, W) image at fractional (rows, cols); points outside read `fill`."""
    h, w = img.shape
    r0, c0 = jnp.floor(rows), jnp.floor(cols)
    fr, fc = rows - r0, cols - c0
    r0, c0 = r0.astype(jnp.int32), c0.astype(jnp.int32)

    def at(r: jax.Array, c: jax.Array) -> jax.Array:
        inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        v = img[jnp.clip(r, 0, h - 1), jnp.clip(c, 0, w - 1)]
        return jnp.where(inside, v, fill)

    top = at(r0, c0) * (1 - fc) + at(r0, c0 + 1) * fc
    bottom = at(r0 + 1, c0) * (1 - fc) + at(r0 + 1, c0 + 1) * fc
    return top * (1 - fr) + bottom * fr


def _geometric(img: jax.Array, draws: _Draws, fill: float) -> jax.Array:
    """Rotation, scale, translation and crop of one (H, W) image as one affine resampling."""
    h, w = img.shape

    def param(name: str, identity: float, i: int = 0) -> jax.Array:
        """The op's parameter, or `identity` when it does not run on this example."""
        return jnp.where(draws.on(name), draws.value(name, i), identity)

    angle = jnp.deg2rad(param("rotate", 0.0))
    scale = param("scale", 1.0)
    shift = jnp.stack([param("translate", 0.0, 0) * h, param("translate", 0.0, 1) * w])
    crop = param("crop", 1.0)
    # The crop window (side `crop` of the image, placed uniformly inside it) is resized to the
    # full image, then scaled and rotated about the centre and shifted. Map each output pixel
    # back: undo the shift, the rotation and scale, then the crop.
    centre = jnp.array([(h - 1) / 2, (w - 1) / 2], jnp.float32)
    corner = jnp.stack([draws.extra("crop", 1), draws.extra("crop", 2)]) * (1 - crop) * 2 * centre
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    # In (row, col) with rows pointing down, turning the content counter-clockwise on screen by
    # `angle` is [[cos, -sin], [sin, cos]]; its inverse (the transpose) maps output to source.
    inverse = jnp.array([[cos, sin], [-sin, cos]]) / scale
    r, c = jnp.meshgrid(
        jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij"
    )
    out = jnp.stack([r, c], -1) - shift - centre
    src = corner + crop * (centre + out @ inverse.T)
    return _bilinear(img, src[..., 0], src[..., 1], fill)


def _intensity_ops(aug: ml_collections.ConfigDict) -> dict[str, Callable]:
    """Per-op f(img (H, W), parameter, noise (H, W)) -> img, for the intensity ops."""
    blur_radius = _radius(aug.blur.range[1])
    sharpen_radius = _radius(aug.sharpen.sigma)
    sharpen_sigma = jnp.float32(aug.sharpen.sigma)

    def contrast(img: jax.Array, factor: jax.Array, _: jax.Array) -> jax.Array:
        mean = img.mean()
        return mean + (img - mean) * factor

    return {
        "blur": lambda img, sigma, _: _blur(img, sigma, blur_radius),
        "sharpen": lambda img, a, _: img + a * (img - _blur(img, sharpen_sigma, sharpen_radius)),
        "brightness": lambda img, delta, _: img + delta,
        "contrast": contrast,
        "gamma": lambda img, gamma, _: img**gamma,
        "noise": lambda img, std, noise: img + std * noise,
    }


def augment(x: jax.Array, rng: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
    """Randomly augment (B, H, W, 1) images in [0, 1], independently per example; stays in [0, 1].

    Example i's random numbers are row i of draws of shape (B, ...) from `rng`: they depend on
    the key and the example's place in the (global) batch, not on how the batch is sharded.
    """
    aug = config.augment
    if not aug.enabled:
        return x
    validate_augment_config(aug)
    if x.ndim != 4 or x.shape[-1] != 1:
        raise ValueError(f"augment expects images of shape (B, H, W, 1), got {x.shape}")
    active_geometric = any(aug[name].prob > 0 for name in GEOMETRIC)
    intensity = {n: f for n, f in _intensity_ops(aug).items() if aug[n].prob > 0}
    if not active_geometric and not intensity:
        return x

    # Every random number in ONE draw, a row per example (the noise field's uniforms after the
    # ops' slots): one PRNG call compiles in a fraction of the time of keys split per example and
    # per op, and row i depends only on `rng`, i and the config (threefry counts per element).
    b, h, w, _ = x.shape
    n_noise = h * w if "noise" in intensity else 0
    u = jax.random.uniform(rng, (b, _N_SLOTS + n_noise))
    batch = (x, u[:, :_N_SLOTS])
    if n_noise:
        # Standard normal by inverse CDF, as jax.random.normal does; u = 0 would map to -inf.
        v = jnp.maximum(2.0 * u[:, _N_SLOTS:] - 1.0, jnp.nextafter(-1.0, 0.0))
        batch += ((jnp.sqrt(2.0) * jax.lax.erf_inv(v)).reshape(b, h, w),)

    def one(img: jax.Array, u: jax.Array, noise: jax.Array | None = None) -> jax.Array:
        draws = _Draws(u, aug)
        img = img[..., 0].astype(jnp.float32)
        if active_geometric:
            img = _geometric(img, draws, aug.fill_value)
        for name, op in intensity.items():
            changed = jnp.clip(op(img, draws.value(name), noise), 0.0, 1.0)
            img = jnp.where(draws.on(name), changed, img)
        return img[..., None]

    return jax.vmap(one)(*batch).astype(x.dtype)
