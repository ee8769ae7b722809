"""The CNN: shapes and dtypes, the seed's parameter count, dropout modes, its conv and pool."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from liverjax import models, preprocess


def config(size: int = 32, **model) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict({"image_size": size, "model": models.default_model_config()})
    c.model.update({"widths": (8, 16), "dense": 16, **model})
    return c


def rngs(seed: int = 0) -> nnx.Rngs:
    # 'rbg' keys: XLA:CPU compiles threefry's initializers ~5x slower, for the same test.
    return nnx.Rngs(
        params=jax.random.key(seed, impl="rbg"), dropout=jax.random.key(seed + 1, impl="rbg")
    )


def images(batch: int = 4, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, size, size, 1), np.float32)


def normal(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, np.float32)


@pytest.mark.parametrize("head", ["flatten", "gap", "max"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_output_shapes_and_dtypes(head, dtype):
    model = models.create_model(config(head=head, dtype=dtype), rngs=rngs())
    model.eval()
    logits, features = model(images(), return_features=True)
    assert logits.shape == (4,) and logits.dtype == jnp.float32
    # Two stages: the last conv runs at 32 / 2 = 16, before its pool.
    assert features.shape == (4, 16, 16, 16)
    assert features.dtype == jnp.dtype(dtype)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert {p.dtype for p in params} == {jnp.dtype(jnp.float32)}
    np.testing.assert_array_equal(model.classify(features), logits)


def test_bfloat16_compute_is_close_to_float32_with_the_same_parameters():
    f32 = models.create_model(config(), rngs=rngs())
    b16 = models.create_model(config(dtype="bfloat16"), rngs=rngs())
    f32.eval(), b16.eval()
    x = images(8)
    a, b = f32(x), b16(x)
    assert float(jnp.abs(a).max()) > 1e-2  # a real comparison, not of zeros
    np.testing.assert_allclose(b, a, atol=0.05 * float(jnp.abs(a).max()))
    assert not np.array_equal(a, b)  # bfloat16 really was used
    # ... but not for the logits: rounded to bfloat16 they tied a third of a batch's scores
    many = np.asarray(b16(jnp.asarray(normal((64, 32, 32, 1), 5))))
    assert not np.array_equal(many, many.astype(jnp.bfloat16).astype(np.float32))
    assert len(np.unique(many)) == many.size


def test_seed_parameter_count_at_128():
    seed = ml_collections.ConfigDict({"image_size": 128, "model": models.default_model_config()})
    model = nnx.eval_shape(lambda: models.create_model(seed, rngs=rngs()))
    convs = (3 * 3 * 1 * 64 + 64) + (3 * 3 * 64 * 128 + 128) + (3 * 3 * 128 * 256 + 256)
    dense = (16 * 16 * 256 * 512 + 512) + (512 * 1 + 1)  # 128 / 2**3 = 16
    assert convs + dense == 33_925_121
    assert models.param_count(model) == 33_925_121
    seed.model.head = "gap"
    gap = nnx.eval_shape(lambda: models.create_model(seed, rngs=rngs()))
    assert models.param_count(gap) == convs + (256 * 512 + 512) + 513


@pytest.mark.parametrize("head, size", [("flatten", 64), ("gap", 48)])
def test_flops_per_image_counts_what_xla_compiles(head, size):
    c = config(size, head=head, widths=(64, 128, 256), dense=512)  # the seed's widths
    counted = models.flops_per_image(c.model, size)
    model = models.create_model(c, rngs=rngs())
    model.eval()
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    cost = forward.lower(state, jnp.zeros((2, size, size, 1))).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"] / 2  # per image
    # XLA leaves out the multiply-adds with SAME padding's zeros at the borders (~5% at these
    # sizes) and adds the elementwise ops; the model count takes every tap.
    assert 0.88 * counted < xla < counted


def test_flops_per_image_of_the_seed_at_224():
    # The seed at 224x224: three conv stages, then the 28x28x256 -> 512 dense layer and the logit.
    convs = 2 * 9 * (224**2 * 1 * 64 + 112**2 * 64 * 128 + 56**2 * 128 * 256)
    dense = 2 * (28 * 28 * 256 * 512) + 2 * 512
    assert models.flops_per_image(models.default_model_config(), 224) == convs + dense
    assert convs + dense == 3_962_700_800


def test_max_head_pools_the_strongest_response_and_gap_the_mean():
    """The heads differ only in how the last pooled features become one vector per image."""
    model = models.create_model(config(head="max"), rngs=rngs())
    model.eval()
    feats = jnp.asarray(np.abs(normal((2, 16, 16, 16), 6)))  # after ReLU: non-negative
    pooled = models.max_pool(feats)
    want = model.out(nnx.relu(model.hidden(pooled.max(axis=(1, 2)))))[:, 0]
    np.testing.assert_allclose(model.classify(feats), want, rtol=1e-6)
    model.head = "gap"  # same parameters, mean instead of max
    want_mean = model.out(nnx.relu(model.hidden(pooled.mean(axis=(1, 2)))))[:, 0]
    np.testing.assert_allclose(model.classify(feats), want_mean, rtol=1e-6)
    assert not np.allclose(want, want_mean)


def test_dropout_differs_in_training_and_eval_is_deterministic():
    model = models.create_model(config(dropout=0.5), rngs=rngs())
    x = images()
    model.eval()
    ev = model(x)
    np.testing.assert_array_equal(model(x), ev)
    np.testing.assert_array_equal(model(x, deterministic=True), ev)
    model.train()
    first, second = model(x), model(x)  # the 'dropout' stream advances
    assert float(jnp.abs(first - ev).max()) > 1e-4
    assert float(jnp.abs(first - second).max()) > 1e-4
    # An explicit key (what a jitted train step passes) is reproducible.
    k, other = jax.random.key(7, impl="rbg"), jax.random.key(8, impl="rbg")
    np.testing.assert_array_equal(model(x, rngs=k), model(x, rngs=k))
    assert float(jnp.abs(model(x, rngs=k) - model(x, rngs=other)).max()) > 1e-4
    np.testing.assert_array_equal(model(x, deterministic=True), ev)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_conv_same_gradients_equal_xla_convolution(k):
    x, w, g = normal((2, 6, 5, 3), 0), normal((k, k, 3, 4), 1), normal((2, 6, 5, 4), 2)

    def xla(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=models.NHWC)

    y, vjp = jax.vjp(models.conv_same, x, w)
    y_ref, vjp_ref = jax.vjp(xla, x, w)
    np.testing.assert_array_equal(y, y_ref)
    for got, want in zip(jax.jit(vjp)(g), vjp_ref(g), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("band_bytes", [None, 1])
@pytest.mark.parametrize("c_in, c_out", [(3, 4), (1, 16)])
def test_conv_same_kernel_gradient_in_row_bands(monkeypatch, band_bytes, c_in, c_out):
    """The CPU kernel gradient over bands of rows (a scan) equals XLA's.

    (3, 4): C_out < 9*C_in; (1, 16): one input channel, C_out > 9*C_in, as the first conv. A
    1-byte band forces one row per scan step; None keeps the default (the whole image in one
    band here).
    """
    if band_bytes is not None:
        monkeypatch.setattr(models, "_PATCH_BAND_BYTES", band_bytes)
    x, w, g = (
        normal((2, 6, 5, c_in), 3),
        normal((3, 3, c_in, c_out), 4),
        normal((2, 6, 5, c_out), 5),
    )

    def xla(w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=models.NHWC)

    # A new function each time: jit's cache does not see the patched module constant.
    kernel_grad = jax.jit(lambda x, g, w: models._kernel_grad_matmul(x, g, w))
    want = jax.vjp(xla, w)[1](g)[0]
    got = kernel_grad(x, g, w)
    assert got.shape == w.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    text = kernel_grad.lower(x, g, w).as_text()
    assert ("while" in text) == (band_bytes is not None)


def test_max_pool_equals_flax_max_pool_also_for_odd_sizes():
    x = normal((2, 7, 6, 3), 0)
    want = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    assert want.shape == (2, 3, 3, 3)
    np.testing.assert_array_equal(models.max_pool(x), want)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model": {"head": "attention"}}, "config.model.head = 'attention'"),
        ({"model": {"dtype": "float16"}}, "config.model.dtype = 'float16'"),
        ({"model": {"dropout": 1.0}}, "config.model.dropout"),
        ({"model": {"widths": ()}}, "config.model.widths"),
        ({"image_size": 34}, "not divisible by 4"),
        ({"image_size": 2}, "image_size >= 4"),
    ],
)
def test_bad_config_is_a_clear_error(change, match):
    c = config()
    c.update(change)
    with pytest.raises(ValueError, match=match):
        models.create_model(c, rngs=rngs())


def test_gap_head_takes_sizes_flatten_cannot_and_flatten_checks_input_size():
    gap = models.create_model(config(34, head="gap"), rngs=rngs())
    assert gap(images(2, 34), deterministic=True).shape == (2,)
    assert models.create_model(config(34, head="max"), rngs=rngs())(images(2, 34)).shape == (2,)
    flat = models.create_model(config(32), rngs=rngs())
    with pytest.raises(ValueError, match="built for 32x32 inputs"):
        flat(images(2, 34), deterministic=True)


def test_missing_field_is_a_clear_error():
    c = config()
    del c.model["dense"]
    with pytest.raises(ValueError, match="config.model is missing dense"):
        models.create_model(c, rngs=rngs())


def test_train_step_compiles_once_and_learns():
    model = models.create_model(config(dropout=0.0), rngs=rngs())
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    traces = []
    x = images(8)
    y = (x.mean(axis=(1, 2, 3)) > 0.5).astype(jnp.float32)  # learnable from the pixels

    @jax.jit
    def step(params, x, y):
        traces.append(1)

        def loss(p):
            z = nnx.merge(graphdef, p, rest)(x)
            return jnp.mean(jnp.maximum(z, 0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z))))

        value, grads = jax.value_and_grad(loss)(params)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), value

    losses = []
    for _ in range(5):
        params, value = step(params, x, y)
        losses.append(float(value))
    assert len(traces) == 1
    assert losses[-1] < losses[0]


def test_model_with_preprocessing_exports_with_a_symbolic_batch_and_without_gathers():
    c = config()
    c.preprocess = preprocess.default_preprocess_config()
    graphdef, params, rest = nnx.split(models.create_model(c, rngs=rngs()), nnx.Param, ...)

    def serve(params, hu):
        x = preprocess.preprocess(hu, c)
        return nnx.merge(graphdef, params, rest)(x, deterministic=True)

    hu = (np.random.default_rng(0).random((3, 48, 48, 1), np.float32) * 600 - 200).round()
    for batch in ("b", "3"):  # SavedModel: any batch; TFLite: a fixed one
        spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"{batch}, 48, 48, 1"), jnp.float32)
        exported = jax.export.export(jax.jit(serve))(params, spec)
        np.testing.assert_allclose(exported.call(params, hu), serve(params, hu), atol=1e-6)
        ops = set(re.findall(r"stablehlo\.([a-z_]+)", exported.mlir_module()))
        assert not ops & {"gather", "dynamic_gather", "scatter", "while"}, ops
        if batch == "3":
            assert "custom_call" not in ops, ops
