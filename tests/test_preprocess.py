"""On-device preprocessing (window, resize) and augmentation."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from liverjax import preprocess


def config(size=16, **augment) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.image_size = size
    c.preprocess = preprocess.default_preprocess_config()
    c.augment = preprocess.default_augment_config()
    for name in list(c.augment):
        if name.endswith("_prob"):
            c.augment[name] = 0.0
    c.augment.update(augment)
    return c


def images(batch=4, size=16, seed=0) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), (batch, size, size, 1))


def test_window_maps_edges_and_clips():
    hu = jnp.array([-1000.0, -160.0, 40.0, 240.0, 3000.0])
    np.testing.assert_allclose(preprocess.window(hu, 40.0, 400.0), [0, 0, 0.5, 1, 1], atol=1e-7)
    assert preprocess.window(hu.astype(jnp.int16), 40.0, 400.0).dtype == jnp.float32
    with pytest.raises(ValueError, match="width"):
        preprocess.window(hu, 40.0, 0.0)


def test_preprocess_windows_and_resizes_only_when_needed():
    hu = jnp.full((2, 16, 16, 1), 40, jnp.int16)
    same = preprocess.preprocess(hu, config(16))
    assert same.shape == (2, 16, 16, 1)
    np.testing.assert_allclose(same, 0.5)
    smaller = preprocess.preprocess(hu, config(8))
    assert smaller.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(smaller, 0.5, atol=1e-6)
    with pytest.raises(ValueError, match="batch, height, width, 1"):
        preprocess.preprocess(hu[..., 0], config(16))


def test_augment_is_identity_when_disabled_or_all_probabilities_zero():
    x = images()
    np.testing.assert_array_equal(preprocess.augment(x, jax.random.key(1), config()), x)
    off = config(rotation_prob=1.0)
    off.augment.enabled = False
    np.testing.assert_array_equal(preprocess.augment(x, jax.random.key(1), off), x)


@pytest.mark.parametrize(
    "op",
    ["rotation", "scale", "translate", "crop", "noise", "blur", "sharpen", "brightness",
     "contrast", "gamma"],
)  # fmt: skip
def test_each_op_changes_the_image_only_when_on(op):
    x = images()
    on = preprocess.augment(x, jax.random.key(2), config(**{f"{op}_prob": 1.0}))
    assert on.shape == x.shape and on.dtype == x.dtype
    assert float(jnp.abs(on - x).max()) > 1e-3, op
    assert float(on.min()) >= 0.0 and float(on.max()) <= 1.0
    # Every example is changed, each differently.
    per_example = jnp.abs(on - x).reshape(x.shape[0], -1).max(axis=1)
    assert bool((per_example > 1e-4).all()), op
    assert len({round(float(v), 6) for v in per_example}) == x.shape[0], op


def test_augment_is_deterministic_for_a_key():
    c = config(rotation_prob=0.5, noise_prob=0.5, blur_prob=0.5, gamma_prob=0.5)
    x = images(8)
    a = preprocess.augment(x, jax.random.key(3), c)
    np.testing.assert_array_equal(a, preprocess.augment(x, jax.random.key(3), c))
    assert float(jnp.abs(a - preprocess.augment(x, jax.random.key(4), c)).max()) > 1e-3


def test_identity_affine_and_zero_sigma_blur_are_exact():
    x = images()
    zeros = jnp.zeros(x.shape[0])
    same = preprocess._affine(x, zeros, jnp.ones(x.shape[0]), zeros, zeros)
    np.testing.assert_allclose(same, x, atol=1e-6)
    np.testing.assert_allclose(preprocess._gaussian_blur(x, zeros, radius=3), x, atol=1e-6)


def test_rotation_by_90_degrees_matches_rot90():
    x = images(1, 9)
    quarter = jnp.full((1,), jnp.pi / 2)
    turned = preprocess._affine(x, quarter, jnp.ones(1), jnp.zeros(1), jnp.zeros(1))
    expected = jnp.rot90(x, k=1, axes=(1, 2))
    assert (
        min(
            float(jnp.abs(turned - expected).max()),
            float(jnp.abs(turned - jnp.rot90(x, k=-1, axes=(1, 2))).max()),
        )
        < 1e-5
    )


def test_augment_compiles_once_under_jit():
    traces = []

    @jax.jit
    def step(x, key):
        traces.append(1)
        return preprocess.augment(x, key, config(rotation_prob=0.5, noise_prob=0.5))

    for seed in range(3):
        step(images(seed=seed), jax.random.key(seed)).block_until_ready()
    assert len(traces) == 1
