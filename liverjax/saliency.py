"""Grad-CAM: where in an image the CNN's last conv layer found evidence for "lesion", in JAX.

Gradient-weighted class activation mapping (Selvaraju et al., ICCV 2017) on the lesion logit y:

    A      = CNN.features(x)                 last conv stage after ReLU, (B, h, w, C)
    alpha  = mean over (h, w) of dy/dA       one weight per channel, (B, C)
    cam    = ReLU(sum_c alpha_c * A_c)        (B, h, w): regions whose activation raises y

then resized (bilinear) to the input size and divided by its maximum, so 1 marks the strongest
lesion evidence in that image and 0 none. The map is as coarse as the last conv layer (h = H / 2
** (stages - 1)); an all-zero map means no region raised the lesion score. The same map is used
for every case shown in the report (false positives and false negatives alike): it always
answers "what made the lesion score higher", never "what made it lower".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from liverjax import models


def _cam(model: models.CNN, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Low-resolution Grad-CAM and logits (traced inside the jitted functions below)."""
    features = model.features(x).astype(jnp.float32)

    def lesion_logit(a: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = model.classify(a, deterministic=True)
        # Each example's logit depends on its own features only: the gradient of the sum is the
        # per-example gradient.
        return logits.sum(), logits

    grads, logits = jax.grad(lesion_logit, has_aux=True)(features)
    weights = grads.mean(axis=(1, 2))  # (B, C)
    cam = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", features, weights))
    return cam, logits


def upsample(cam: jax.Array, size: tuple[int, int]) -> jax.Array:
    """(B, h, w) maps → (B, H, W), bilinear, each divided by its maximum (all-zero maps stay 0)."""
    cam = jax.image.resize(cam, (cam.shape[0], *size), method="bilinear")
    peak = cam.max(axis=(1, 2), keepdims=True)
    return jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0)


@nnx.jit
def grad_cam_raw(model: models.CNN, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(cam (B, h, w) float32 >= 0 at the last conv layer's resolution, logits (B,)) for x."""
    return _cam(model, x)


@nnx.jit
def grad_cam(model: models.CNN, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(maps (B, H, W) in [0, 1] at the input size, logits (B,)) for preprocessed images x."""
    cam, logits = _cam(model, x)
    return upsample(cam, x.shape[1:3]), logits
