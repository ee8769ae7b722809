"""On-device preprocessing (HU window, resize) and augmentation: exact identities, each op's
effect against an independent computation, per-example randomness, one compilation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from liverjax import dicom, parallel, preprocess

# A range for each op that really changes an image (no identity value inside it).
CHANGING = {
    "rotate": (20.0, 30.0),
    "scale": (1.2, 1.3),
    "translate": (0.1, 0.2),
    "crop": (0.6, 0.7),
    "blur": (1.0, 1.5),
    "sharpen": (1.0, 2.0),
    "brightness": (0.1, 0.2),
    "contrast": (0.5, 0.6),
    "gamma": (1.5, 2.0),
    "noise": (0.05, 0.1),
}


def config(size: int = 16, **ops: tuple[float, float] | dict) -> ml_collections.ConfigDict:
    """Default config with every op off, then `op=(lo, hi)` (prob 1) or `op={...}` overrides."""
    c = ml_collections.ConfigDict({"image_size": size})
    c.preprocess = preprocess.default_preprocess_config()
    c.augment = preprocess.default_augment_config()
    for name in preprocess.OPS:
        c.augment[name].prob = 0.0
    for name, change in ops.items():
        change = change if isinstance(change, dict) else {"prob": 1.0, "range": change}
        c.augment[name].update(change)
    return c


def images(batch: int = 4, size: int = 16, seed: int = 0) -> np.ndarray:
    """Values in [0.2, 0.8], so that no op's change is hidden by clipping."""
    return 0.2 + 0.6 * np.random.default_rng(seed).random((batch, size, size, 1), np.float32)


# Compiled once per distinct config (a FrozenConfigDict is hashable: a static argument).
_augment = jax.jit(preprocess.augment, static_argnums=2)


def run(x: np.ndarray, c: ml_collections.ConfigDict, seed: int = 1) -> np.ndarray:
    return np.asarray(_augment(x, jax.random.key(seed), ml_collections.FrozenConfigDict(c)))


def test_window_maps_edges_and_clips():
    hu = jnp.array([-160.0, 40.0, 240.0, -3000.0, 3000.0, 140.0])
    np.testing.assert_array_equal(preprocess.window(hu, 40.0, 400.0), [0, 0.5, 1, 0, 1, 0.75])
    as_int = preprocess.window(hu.astype(jnp.int16), 40.0, 400.0)
    assert as_int.dtype == jnp.float32
    np.testing.assert_array_equal(as_int, [0, 0.5, 1, 0, 1, 0.75])
    with pytest.raises(ValueError, match="window width must be > 0"):
        preprocess.window(hu, 40.0, 0.0)


def test_preprocess_keeps_size_when_it_matches_and_resizes_otherwise():
    hu = np.random.default_rng(0).integers(-300, 400, (2, 16, 16, 1)).astype(np.int16)
    same = preprocess.preprocess(hu, config(16))
    assert same.shape == (2, 16, 16, 1) and same.dtype == jnp.float32
    np.testing.assert_array_equal(same, preprocess.window(hu, 40.0, 400.0))
    flat = preprocess.preprocess(np.full((2, 32, 32, 1), 140, np.int16), config(16))
    assert flat.shape == (2, 16, 16, 1)
    np.testing.assert_allclose(flat, 0.75, atol=1e-6)
    # A left-to-right ramp halved in size stays a ramp (antialiased: means of pixel pairs).
    ramp = np.broadcast_to((np.arange(32) * 10 - 160).astype(np.int16), (1, 32, 32))[..., None]
    small = np.asarray(preprocess.preprocess(ramp, config(16)))[0, 8, :, 0]
    np.testing.assert_allclose(np.diff(small)[1:-1], 20 / 400, atol=1e-6)


def test_float_hu_are_read_as_the_records_hold_them():
    # Rounded half to even and clipped to int16, as dicom.to_int16 writes the records: a float
    # image fed to the exported or served model scores as liverjax.predict scores it.
    rng = np.random.default_rng(1)
    hu = rng.uniform(-1200, 1200, (2, 16, 16, 1)).astype(np.float32)
    hu[0, 0, :4, 0] = [40.5, 41.5, -40000.0, 40000.0]
    for size in (16, 8):
        got = preprocess.preprocess(hu, config(size))
        np.testing.assert_array_equal(got, preprocess.preprocess(dicom.to_int16(hu), config(size)))
    first = np.asarray(preprocess.preprocess(hu, config(16)))[0, 0, :4, 0]
    np.testing.assert_allclose(first, [0.5, 0.505, 0.0, 1.0], atol=1e-7)  # 40.5 -> 40, 41.5 -> 42


@pytest.mark.parametrize(
    "shape, match", [((2, 16, 16), r"\(B, H, W, 1\)"), ((2, 16, 12, 1), "square")]
)
def test_preprocess_rejects_bad_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        preprocess.preprocess(jnp.zeros(shape, jnp.int16), config(16))


def test_augment_is_exact_identity_when_disabled_or_everything_off():
    x = images()
    np.testing.assert_array_equal(run(x, config()), x)
    on = config(**CHANGING)
    on.augment.enabled = False
    assert preprocess.augment(x, jax.random.key(0), on) is x


@pytest.mark.parametrize("op", preprocess.OPS)
def test_each_op_alone_changes_every_image_with_prob_1_and_none_with_prob_0(op):
    x = images()
    changed = run(x, config(**{op: CHANGING[op]}))
    per_image = np.abs(changed - x).mean(axis=(1, 2, 3))
    assert (per_image > 1e-3).all(), per_image
    assert changed.min() >= 0.0 and changed.max() <= 1.0
    off = config(**{op: {"prob": 0.0, "range": CHANGING[op]}})
    np.testing.assert_array_equal(run(x, off), x)


def test_an_op_with_prob_one_half_leaves_the_other_examples_exactly_unchanged():
    x = images(batch=16)
    out = run(x, config(rotate={"prob": 0.5, "range": CHANGING["rotate"]}, noise={"prob": 0.5}))
    same = (out == x).all(axis=(1, 2, 3))
    assert 0 < same.sum() < 16, same


def test_augment_is_deterministic_for_a_key_and_differs_across_keys_and_examples():
    x = np.repeat(images(batch=1), 6, axis=0)  # six copies of one image
    c = config(**CHANGING)
    a = run(x, c, seed=3)
    np.testing.assert_array_equal(a, run(x, c, seed=3))
    assert np.abs(a - run(x, c, seed=4)).max() > 1e-2
    flat = a.reshape(6, -1)
    assert min(np.abs(flat[i] - flat[j]).max() for i in range(6) for j in range(i)) > 1e-2


def test_identity_parameters_resample_to_the_same_image():
    x = images()
    c = config(rotate=(0.0, 0.0), scale=(1.0, 1.0), translate=(0.0, 0.0), crop=(1.0, 1.0))
    np.testing.assert_allclose(run(x, c), x, atol=1e-5)


def test_rotation_by_90_degrees_is_counter_clockwise():
    x = images(batch=2, size=17)  # odd: the centre is a pixel, a quarter turn maps pixels
    np.testing.assert_allclose(run(x, config(17, rotate=(90.0, 90.0))), np.rot90(x, axes=(1, 2)),
                               atol=1e-5)  # fmt: skip


def test_translation_moves_content_down_and_right_and_fills_with_fill_value():
    x = images()
    out = run(x, config(translate=(0.25, 0.25)))  # 4 pixels of 16
    np.testing.assert_allclose(out[:, 4:, 4:], x[:, :-4, :-4], atol=1e-6)
    np.testing.assert_array_equal(out[:, :4], 0.0)
    np.testing.assert_array_equal(out[:, :, :4], 0.0)


def test_scale_and_crop_stretch_a_ramp():
    ramp = np.broadcast_to(np.arange(17, dtype=np.float32) / 16, (1, 17, 17))[..., None]
    zoomed = run(ramp, config(17, scale=(2.0, 2.0)))[0, 8, 4:13, 0]
    np.testing.assert_allclose(np.diff(zoomed), 0.5 / 16, atol=1e-6)
    cropped = run(ramp, config(17, crop=(0.5, 0.5)))[0, 8, :, 0]
    np.testing.assert_allclose(np.diff(cropped), 0.5 / 16, atol=1e-6)


def test_blur_and_sharpen_match_scipy():
    x = images(batch=1)
    want = ndimage.gaussian_filter(x[0, ..., 0], 1.2, mode="mirror", truncate=3.0)
    np.testing.assert_allclose(run(x, config(blur=(1.2, 1.2)))[0, ..., 0], want, atol=1e-5)
    soft = ndimage.gaussian_filter(x[0, ..., 0], 1.0, mode="mirror", truncate=3.0)
    sharp = np.clip(x[0, ..., 0] + 0.5 * (x[0, ..., 0] - soft), 0, 1)
    out = run(x, config(sharpen={"prob": 1.0, "range": (0.5, 0.5), "sigma": 1.0}))
    np.testing.assert_allclose(out[0, ..., 0], sharp, atol=1e-5)


def test_intensity_ops_compute_what_they_say():
    x = images()
    np.testing.assert_allclose(run(x, config(brightness=(0.1, 0.1))), x + 0.1, atol=1e-6)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(run(x, config(contrast=(0.5, 0.5))), mean + (x - mean) / 2,
                               atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(run(x, config(gamma=(2.0, 2.0))), x**2, atol=1e-6)
    noise = run(x, config(noise=(0.02, 0.02))) - x
    assert abs(noise.std() - 0.02) < 0.002 and abs(noise.mean()) < 0.002


def test_values_stay_in_unit_interval_with_every_op_at_its_strongest():
    wide = {
        **CHANGING,
        "brightness": (-0.8, 0.8),
        "contrast": (0.0, 3.0),
        "noise": (0.3, 0.5),
        "sharpen": (5.0, 10.0),
    }
    out = run(images(batch=8), config(**wide))
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.isfinite(out).all()


def test_augment_compiles_once_and_is_independent_of_sharding():
    c = config(**CHANGING)
    traces = []

    def f(x, key):
        traces.append(1)
        return preprocess.augment(x, key, c)

    step = jax.jit(f)
    x = images(batch=8)
    outs = [np.asarray(step(x, jax.random.key(s))) for s in range(3)]
    assert len(traces) == 1
    sharded = jax.device_put(x, parallel.batch_sharding(parallel.create_mesh()))  # as training
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(step(sharded, jax.random.key(2))), outs[2], atol=1e-6)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"rotation": {"prob": 1.0}}, r"unknown field\(s\) \['rotation'\]"),
        ({"blur": {"prob": 1.5}}, r"config.augment.blur.prob = 1.5"),
        ({"gamma": {"range": (0.0, 1.0)}}, r"config.augment.gamma.range .* must be > 0"),
        ({"crop": {"range": (0.5, 1.5)}}, r"config.augment.crop.range .* at most 1"),
        ({"scale": {"range": (1.2, 1.1)}}, r"lo <= hi"),
        # outside the windowed [0, 1], kept by every op but the intensity ones, which clip
        ({"fill_value": -1.0}, r"config.augment.fill_value = -1.0: must be in \[0, 1\]"),
        ({"fill_value": float("nan")}, r"config.augment.fill_value = nan"),
    ],
)
def test_bad_augment_config_is_a_clear_error(change, match):
    c = config()
    c.augment.update(change)
    with pytest.raises(ValueError, match=match):
        preprocess.augment(images(), jax.random.key(0), c)


def test_validate_config_names_the_bad_key():
    preprocess.validate_config(config())
    preprocess.validate_augment_config(preprocess.default_augment_config())  # defaults are valid
    c = config()
    c.preprocess.window_width = 0.0
    with pytest.raises(ValueError, match="config.preprocess.window_width = 0.0"):
        preprocess.validate_config(c)
    c = config()
    del c["augment"]
    with pytest.raises(ValueError, match="config has no 'augment'"):
        preprocess.validate_config(c)
