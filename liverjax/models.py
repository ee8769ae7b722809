"""The lesion classifier: the seed CNN (conv-pool stages, dense, dropout, one logit) in Flax NNX.

Seed network, at `config.model` defaults: conv 3x3 64 + ReLU + max-pool 2, conv 128 + pool,
conv 256 + pool, flatten, dense 512 + ReLU, dropout 0.25, dense 1. The output is a logit;
apply `jax.nn.sigmoid` for a lesion probability.

`config.model` fields (ml_collections.ConfigDict), see `default_model_config()`:
  widths       tuple of int   output channels of the conv stages, one stage (conv+ReLU+pool) each
  kernel_size  int            conv kernel side (SAME padding)
  dense        int            width of the hidden dense layer
  head         str            'flatten' (the seed), 'gap' (global average pooling) or 'max'
                              (global max pooling: any-position detection, input-size agnostic)
  dropout      float          dropout rate after the hidden dense layer, in [0, 1)
  dtype        str            compute dtype, 'float32' or 'bfloat16'; parameters stay float32
and `config.image_size` (int), the side of the square input.

Other networks: `config.model.name` (absent: 'cnn', the seed) names a network registered with
`register_model(name, create, validate)`; `config.model.module`, when set, is imported first, so a
module that registers its networks at import works in training (from a config file of yours that
sets both keys: the default config has neither, so `--config.model.name` alone is no override) and
in evaluation, export and serving (which read the workdir's config.json). `create(config, rngs)`
returns an `nnx.Module` whose `__call__(x, *, deterministic, rngs)` maps preprocessed (B, H, W, 1)
float32 images to (B,) float32 logits (dropout and batch statistics follow `deterministic`: True in
evaluation); variables other than `nnx.Param` (e.g. `nnx.BatchStat`) are kept as model state and
checkpointed. Grad-CAM also needs `features(x)` (the last spatial feature map) and
`classify(features, *, deterministic)`; without them the report shows no saliency maps.
`validate(config)` raises ValueError naming the config key it cannot build from.

Speed (XLA:CPU, 2 AVX2 cores, seed network at 128x128, batch 32; measured on a shared machine,
so in images per CPU-second of the train step, best of repeats; runs vary by about 15%):
  * The kernel gradient of a conv, as autodiff emits it (a convolution contracting over the batch),
    runs on a slow generic path in XLA:CPU: 3.7 s CPU for 64->128 at 64x64 and 4.9-5.2 s for
    128->256 at 32x32, where the forward convs take 0.4 s. `conv_same` computes it instead with
    im2col GEMMs over bands of rows (`_kernel_grad_matmul`); other platforms keep XLA's gradient
    (cuDNN on GPU). Train step fp32: 2.6 -> 7.2-9.0 images per CPU-second with one whole-batch
    GEMM; the bands (patches that stay in cache, channels kept minor so the activations are not
    transposed) then took the in-memory train step from 10.9-11.6 to 13.7-18.5 images/s (wall,
    2 cores), and accumulating the transposed gradient (one plain GEMM a band, no transposed
    operand) made the train step 1.10x faster again (same process, interleaved steps). bf16:
    2.2-2.7 -> 5.0-5.7 per CPU-second (no bf16 arithmetic on AVX2: use float32 on such CPUs).
  * `max_pool` is the max of four strided slices, not `nnx.max_pool`: the same values, and its
    gradient is selects, where reduce_window's is `select_and_scatter_add`. Pool (+ ReLU) of
    (32, 128, 128, 64), forward and backward: 1.25-1.40 s CPU with reduce_window, 0.42 s with a
    reshape + max over the window axes, 0.30 s with slices (forward alone: 55 / 154 / 36 ms). In
    the whole train step the gain is within the run-to-run spread (7.2-7.7 vs 7.2-8.2).
    Ties of positive values share the gradient (reduce_window gives it to one element).
  * Layouts are NHWC / HWIO end to end; nothing loops over the batch in Python.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

HEADS = ("flatten", "gap", "max")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NHWC = ("NHWC", "HWIO", "NHWC")  # conv dimension numbers: channels-last images, HWIO kernels
# Each conv stage ends with a 2x2 max-pool of stride 2 (the seed's design), halving H and W.
POOL = 2


def default_model_config() -> ml_collections.ConfigDict:
    """The seed network's `config.model`."""
    return ml_collections.ConfigDict(
        {
            "widths": (64, 128, 256),
            "kernel_size": 3,
            "dense": 512,
            "head": "flatten",
            "dropout": 0.25,
            "dtype": "float32",
        }
    )


def _fail(key: str, value: object, problem: str, fix: str) -> None:
    raise ValueError(f"config.model.{key} = {value!r}: {problem}; {fix}")


def validate_model_config(model_config: ml_collections.ConfigDict, image_size: int) -> None:
    """Raise ValueError naming the key if `config.model` (with `config.image_size`) cannot build."""
    missing = [k for k in default_model_config() if k not in model_config]
    if missing:
        raise ValueError(
            f"config.model is missing {', '.join(missing)}; "
            f"start from liverjax.models.default_model_config()"
        )
    widths = tuple(model_config.widths)
    if not widths or not all(isinstance(w, int) and w > 0 for w in widths):
        _fail("widths", widths, "needs one or more positive ints", "e.g. (64, 128, 256)")
    if not isinstance(model_config.kernel_size, int) or model_config.kernel_size < 1:
        _fail("kernel_size", model_config.kernel_size, "must be a positive int", "e.g. 3")
    if not isinstance(model_config.dense, int) or model_config.dense < 1:
        _fail("dense", model_config.dense, "must be a positive int", "e.g. 512")
    if model_config.head not in HEADS:
        _fail("head", model_config.head, "unknown head", f"use one of {HEADS}")
    if not 0.0 <= model_config.dropout < 1.0:
        _fail("dropout", model_config.dropout, "rate must be in [0, 1)", "e.g. 0.25")
    if model_config.dtype not in DTYPES:
        _fail("dtype", model_config.dtype, "unknown compute dtype", f"use one of {tuple(DTYPES)}")
    reduction = POOL ** len(widths)
    if not isinstance(image_size, int) or image_size < reduction:
        raise ValueError(
            f"config.image_size = {image_size!r}: {len(widths)} pooling stages need an int "
            f"image_size >= {reduction}; raise image_size or use fewer config.model.widths"
        )
    if model_config.head == "flatten" and image_size % reduction:
        raise ValueError(
            f"config.image_size = {image_size} is not divisible by {reduction} "
            f"(= {POOL}**len(config.model.widths)), which the 'flatten' head needs; "
            f"use e.g. image_size={image_size // reduction * reduction}, or head='gap'"
        )


def _conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=NHWC)


# Bytes of im2col patches one step of the banded kernel gradient builds: they stay in the
# last-level cache (32 MB on the 2-core development machine) while its GEMM reads them back
# (see `_kernel_grad_matmul`).
_PATCH_BAND_BYTES = 32 << 20


def _kernel_grad_matmul(x: jax.Array, g: jax.Array, kernel: jax.Array) -> jax.Array:
    """Kernel gradient of a SAME stride-1 conv as GEMMs: g^T (C_out, N) @ patches (N, k*k*C_in).

    The patches of the whole batch (k*k times the input: 300 MB for the seed's second conv at
    batch 32) make the GEMM wait on memory, so it runs over bands of rows with a `lax.scan`, each
    band's patches at most `_PATCH_BAND_BYTES`. Bands of rows, not of the batch, so that a batch
    sharded over devices stays sharded. The scan accumulates the transposed gradient
    (C_out, k*k*C_in) and transposes it once at the end: with the transpose inside the loop
    body, XLA folded it into the GEMM's operands and ran a slower transposed-operand GEMM
    (batch 32, 2 cores: 64->128 at 64x64 0.43 -> 0.35 s, 128->256 at 32x32 0.36 -> 0.27 s,
    1->64 at 128x128 0.10 -> 0.04 s, measured side by side).
    """
    k, _, c_in, c_out = kernel.shape
    b, h, w, _ = x.shape
    lo, hi = (k - 1) // 2, k // 2  # SAME padding, as lax.conv_general_dilated pads
    xp = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
    row_bytes = k * k * c_in * b * w * x.dtype.itemsize
    fits = [r for r in range(1, h + 1) if h % r == 0 and r * row_bytes <= _PATCH_BAND_BYTES]
    rows = max(fits or [1])

    def band(start: jax.Array | int) -> jax.Array:
        xb = jax.lax.dynamic_slice_in_dim(xp, start, rows + k - 1, axis=1)
        gb = jax.lax.dynamic_slice_in_dim(g, start, rows, axis=1)
        # (B, rows, W, k*k, C_in): channels stay minor, so no transpose of the activations.
        patches = jnp.stack(
            [xb[:, i : i + rows, j : j + w] for i in range(k) for j in range(k)], axis=3
        )
        # Flattened to 2-D first: with C_in = 1 (the first conv) the 5-D einsum took 2x longer.
        return jax.lax.dot_general(
            gb.reshape(-1, c_out),
            patches.reshape(-1, k * k * c_in),
            (((0,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,
        )

    if rows == h:
        dk_t = band(0)
    else:
        dk_t, _ = jax.lax.scan(
            lambda acc, i: (acc + band(i * rows), None),
            jnp.zeros((c_out, k * k * c_in), jnp.float32),
            jnp.arange(h // rows),
        )
    return dk_t.reshape(c_out, k, k, c_in).transpose(1, 2, 3, 0).astype(kernel.dtype)


def _kernel_grad_conv(x: jax.Array, g: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.vjp(lambda k: _conv(x, k), kernel)[1](g)[0]


@jax.custom_vjp
def conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 SAME conv, NHWC x HWIO, whose kernel gradient on CPU is one im2col GEMM.

    XLA:CPU runs the kernel-gradient convolution that autodiff emits on a slow generic path (see
    the module docstring); other platforms keep XLA's own gradient (cuDNN on GPU). The forward
    and the input gradient are XLA's convolutions everywhere.
    """
    return _conv(x, kernel)


def _conv_same_fwd(x: jax.Array, kernel: jax.Array) -> tuple[jax.Array, tuple]:
    return _conv(x, kernel), (x, kernel)


def _conv_same_bwd(res: tuple, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, kernel = res
    dx = jax.vjp(lambda x: _conv(x, kernel), x)[1](g)[0]
    dk = jax.lax.platform_dependent(
        x, g, kernel, cpu=_kernel_grad_matmul, default=_kernel_grad_conv
    )
    return dx, dk


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


def _conv_general_dilated(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, ...],
    padding: str,
    *,
    lhs_dilation: tuple[int, ...],
    rhs_dilation: tuple[int, ...],
    dimension_numbers: object,
    feature_group_count: int,
    precision: object,
    **kwargs: object,
) -> jax.Array:
    """`lax.conv_general_dilated` as nnx.Conv calls it, for the only case CNN uses: `conv_same`."""
    unit = (1,) * (x.ndim - 2)
    plain = all(v is None for v in kwargs.values()) and precision is None
    if (
        (tuple(strides), padding, tuple(lhs_dilation), tuple(rhs_dilation))
        != (unit, "SAME", unit, unit)
        or feature_group_count != 1
        or not plain
    ):
        raise NotImplementedError(
            "liverjax.models.conv_same supports only stride-1, undilated, ungrouped SAME convs"
        )
    return conv_same(x, kernel)


def max_pool(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, VALID (an odd last row/column is dropped), on NHWC.

    The max of four strided slices: the same values as `nnx.max_pool`, but XLA fuses it, and its
    gradient is selects rather than reduce_window's `select_and_scatter_add`, which XLA:CPU runs
    slowly (see the module docstring). `lax.slice_in_dim`, not `x[:, ::2]`: with a symbolic
    batch (export), numpy-style strided indexing lowers to a gather.
    """
    h, w = x.shape[1] // POOL * POOL, x.shape[2] // POOL * POOL

    def part(i: int, j: int) -> jax.Array:
        rows = jax.lax.slice_in_dim(x, i, h, POOL, axis=1)
        return jax.lax.slice_in_dim(rows, j, w, POOL, axis=2)

    return jnp.maximum(jnp.maximum(part(0, 0), part(0, 1)), jnp.maximum(part(1, 0), part(1, 1)))


class CNN(nnx.Module):
    """Conv stages + dense head that maps (B, H, W, 1) images in [0, 1] to (B,) float32 logits."""

    def __init__(self, model_config: ml_collections.ConfigDict, *, image_size: int, rngs: nnx.Rngs):
        validate_model_config(model_config, image_size)
        self.image_size = image_size
        self.head = model_config.head
        self.dtype = DTYPES[model_config.dtype]
        widths = tuple(model_config.widths)
        layer = {"dtype": self.dtype, "param_dtype": jnp.float32, "rngs": rngs}
        self.convs = nnx.List(
            [
                nnx.Conv(
                    c_in,
                    c_out,
                    (model_config.kernel_size,) * 2,
                    padding="SAME",
                    conv_general_dilated=_conv_general_dilated,
                    **layer,
                )
                for c_in, c_out in zip((1,) + widths[:-1], widths, strict=True)
            ]
        )
        side = image_size // POOL ** len(widths)
        in_dense = widths[-1] * (side * side if self.head == "flatten" else 1)
        self.hidden = nnx.Linear(in_dense, model_config.dense, **layer)
        self.dropout = nnx.Dropout(model_config.dropout, rngs=rngs)
        # The output layer in float32 whatever the compute dtype: bfloat16 logits (8 bits of
        # mantissa) tie a third of a batch's scores, and ranking (AUC) and thresholds lose them.
        self.out = nnx.Linear(model_config.dense, 1, **(layer | {"dtype": jnp.float32}))

    def features(self, x: jax.Array) -> jax.Array:
        """The last conv stage's activations, after ReLU and before its pool: (B, h, w, C)."""
        if x.ndim != 4 or x.shape[-1] != 1:
            raise ValueError(f"CNN expects images of shape (B, H, W, 1), got {x.shape}")
        if self.head == "flatten" and x.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(
                f"this CNN was built for {self.image_size}x{self.image_size} inputs "
                f"(config.image_size) but got {x.shape[1]}x{x.shape[2]}; "
                f"resize with liverjax.preprocess.preprocess"
            )
        h = x.astype(self.dtype)  # the result is in the compute dtype too
        for conv in self.convs[:-1]:
            # relu(pool(z)) == pool(relu(z)) exactly, with the ReLU on a quarter of the elements.
            h = nnx.relu(max_pool(conv(h)))
        return nnx.relu(self.convs[-1](h))

    def classify(
        self,
        features: jax.Array,
        *,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | jax.Array | None = None,
    ) -> jax.Array:
        """Logits (B,) float32 from `features()`: last pool, head, dense, dropout, output layer."""
        h = max_pool(features)
        if self.head == "flatten":
            h = h.reshape(h.shape[0], -1)
        elif self.head == "gap":
            h = h.mean(axis=(1, 2))
        else:  # "max": the strongest response anywhere, as for "is there a lesion on this slice"
            h = h.max(axis=(1, 2))
        h = nnx.relu(self.hidden(h))
        h = self.dropout(h, deterministic=deterministic, rngs=rngs)
        return jnp.squeeze(self.out(h.astype(jnp.float32)), -1)  # not [:, 0]: a gather in export

    def __call__(
        self,
        x: jax.Array,
        *,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | jax.Array | None = None,
        return_features: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Logits (B,) float32; with `return_features`, (logits, last conv features) for Grad-CAM.

        Dropout follows `model.train()` / `model.eval()` unless `deterministic` is given; its key
        comes from the 'dropout' stream of the Rngs given at construction, or from `rngs`.
        """
        feats = self.features(x)
        logits = self.classify(feats, deterministic=deterministic, rngs=rngs)
        return (logits, feats) if return_features else logits


@dataclasses.dataclass(frozen=True)
class Registered:
    """A network `config.model.name` can name (see the module docstring)."""

    create: Callable[[ml_collections.ConfigDict, nnx.Rngs], nnx.Module]
    validate: Callable[[ml_collections.ConfigDict], None] | None = None


SEED_MODEL = "cnn"
_MODELS: dict[str, Registered] = {}


def register_model(
    name: str,
    create: Callable[[ml_collections.ConfigDict, nnx.Rngs], nnx.Module],
    validate: Callable[[ml_collections.ConfigDict], None] | None = None,
) -> None:
    """Make `config.model.name = name` build `create(config, rngs)` (checked by `validate`)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"register_model: name {name!r} must be a non-empty string")
    _MODELS[name] = Registered(create, validate)


def model_name(config: ml_collections.ConfigDict) -> str:
    """`config.model.name` (the seed CNN when absent)."""
    return str(config.model.get("name", SEED_MODEL))


def registered(config: ml_collections.ConfigDict) -> Registered:
    """The network `config.model` names, importing `config.model.module` first when set."""
    for key in ("model", "image_size"):
        if key not in config:
            raise ValueError(f"config has no '{key}'; see liverjax.models.default_model_config()")
    module = config.model.get("module")
    if module:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(
                f"config.model.module = {module!r} cannot be imported ({e}); it must be on "
                "the Python path of training, evaluation and export alike"
            ) from None
    name = model_name(config)
    if name not in _MODELS:
        raise ValueError(
            f"config.model.name = {name!r}: no network of that name is registered (known: "
            f"{', '.join(sorted(_MODELS))}); register it with liverjax.models.register_model, "
            "in the module that config.model.module names"
        )
    return _MODELS[name]


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the key if the network `config.model` names cannot be built."""
    entry = registered(config)
    if entry.validate is not None:
        try:
            entry.validate(config)
        except ValueError as e:  # the network's own check of the user's config: said in one line
            raise ValueError(str(e)) from e


def create_model(config: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> nnx.Module:
    """The network that `config.model` and `config.image_size` describe (the seed CNN unless
    `config.model.name` names another)."""
    return registered(config).create(config, rngs)


register_model(
    SEED_MODEL,
    lambda config, rngs: CNN(config.model, image_size=config.image_size, rngs=rngs),
    lambda config: validate_model_config(config.model, config.image_size),
)


def flops_per_image(model_config: ml_collections.ConfigDict, image_size: int) -> int:
    """Model FLOPs of one image's forward pass: 2 x the multiply-adds of the convs and dense layers.

    The usual count for model FLOP utilisation (bias, ReLU, pooling and the head's reduction are
    left out); a training step is taken as 3x (forward, input gradient, kernel gradient).
    """
    validate_model_config(model_config, image_size)
    k, side, c_in, flops = model_config.kernel_size, image_size, 1, 0
    for c_out in model_config.widths:
        flops += 2 * side * side * k * k * c_in * c_out
        c_in, side = c_out, side // POOL
    in_dense = c_in * (side * side if model_config.head == "flatten" else 1)
    return flops + 2 * in_dense * model_config.dense + 2 * model_config.dense


def param_count(model: nnx.Module) -> int:
    """Number of trainable parameters."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
