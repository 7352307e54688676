"""Models: a pure ``init`` / ``apply`` pair plus the task that fixes the loss and the metrics.

A :class:`Model` is what the engine trains. The built-in models are the ones federated-learning
papers use (linear, logistic and softmax regression; McMahan et al.'s 2NN and CNN). Any Flax module
plugs in through :func:`from_linen` (``flax.linen``) or :func:`from_nnx` (``flax.nnx``); any other
pure function pair through :func:`from_functions`.

Tasks and their per-example losses:

* ``"regression"``: scalar output ``ŷ``, loss ``½ (ŷ − y)²`` (so the gradient of ``ŷ = w·x`` is
  ``(w·x − y) x``, the convention of the worked example in the references);
* ``"binary"``: one logit ``z``, loss is the binary cross-entropy of ``σ(z)``, accuracy of ``z > 0``;
* ``"multiclass"``: ``num_classes`` logits, softmax cross-entropy, accuracy of the arg-max.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from fedjax_sim._checks import positive_int

Params = Any
TASKS = ("regression", "binary", "multiclass")


class Model(NamedTuple):
  """A trainable model.

  Attributes:
    init: ``init(key) -> params`` (a pytree).
    apply: ``apply(params, x) -> outputs`` for a batch ``x`` of shape ``[batch, *feature_shape]``.
    task: one of ``"regression"``, ``"binary"``, ``"multiclass"``.
    name: a short human-readable name.
  """
  init: Callable[[jax.Array], Params]
  apply: Callable[[Params, jax.Array], jax.Array]
  task: str
  name: str = "model"

  def per_example_loss(self, params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Loss of each example, shape ``[batch]``."""
    return loss_from_outputs(self.task, self.apply(params, x), y)

  def loss(self, params: Params, x: jax.Array, y: jax.Array, mask: jax.Array | None = None):
    """Mean loss over the real examples of a batch (``mask`` marks them; all when ``None``)."""
    losses = self.per_example_loss(params, x, y)
    if mask is None:
      return jnp.mean(losses)
    mask = mask.astype(losses.dtype)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)

  def correct(self, params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """1.0 where the prediction is right (classifiers only), shape ``[batch]``."""
    return correct_from_outputs(self.task, self.apply(params, x), y)

  @property
  def is_classifier(self) -> bool:
    return self.task != "regression"


def loss_from_outputs(task: str, out: jax.Array, y: jax.Array) -> jax.Array:
  """Per-example loss of model outputs ``out`` for labels ``y`` under ``task``."""
  if task == "regression":
    return 0.5 * jnp.square(out.reshape(y.shape) - y)
  if task == "binary":
    return optax.sigmoid_binary_cross_entropy(out.reshape(y.shape), y.astype(out.dtype))
  return optax.softmax_cross_entropy_with_integer_labels(out, y)


def correct_from_outputs(task: str, out: jax.Array, y: jax.Array) -> jax.Array:
  """Per-example 1.0/0.0 correctness of classifier outputs ``out`` for labels ``y``."""
  if task == "binary":
    return ((out.reshape(y.shape) > 0) == (y > 0)).astype(jnp.float32)
  if task == "multiclass":
    return (jnp.argmax(out, axis=-1) == y).astype(jnp.float32)
  raise ValueError("accuracy is only defined for classifiers")


def _check_task(task: str) -> str:
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
  return task


def from_functions(init: Callable, apply: Callable, task: str, name: str = "custom") -> Model:
  """Wraps any pure ``init(key) -> params`` and ``apply(params, x) -> outputs`` pair."""
  return Model(init, apply, _check_task(task), name)


def from_linen(module, example_x, task: str, name: str | None = None) -> Model:
  """Adapts a ``flax.linen`` module: params are ``module.init(key, x)["params"]``.

  Args:
    module: the linen module; ``module.apply({"params": p}, x)`` must return the outputs.
    example_x: one batch of inputs (any batch size) used to trace the parameter shapes.
    task: ``"regression"``, ``"binary"`` or ``"multiclass"``.
  """
  example_x = jnp.asarray(example_x)
  def init(key):
    return module.init(key, example_x)["params"]
  def apply(params, x):
    return module.apply({"params": params}, x)
  return Model(init, apply, _check_task(task), name or type(module).__name__)


def from_nnx(make_module: Callable, task: str, name: str | None = None) -> Model:
  """Adapts a ``flax.nnx`` module built by ``make_module(rngs)``.

  Params are the module's ``nnx.Param`` state as a plain nested dict; ``apply`` merges them back
  into the module's graph (``nnx.merge``) inside the compiled computation, so vmap over clients works.
  """
  from flax import nnx
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: make_module(nnx.Rngs(0))))
  def init(key):
    _, state = nnx.split(make_module(nnx.Rngs(key)))
    return nnx.to_pure_dict(state)
  def apply(params, x):
    state = jax.tree.map(lambda v: v, abstract_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)(x)
  return Model(init, apply, _check_task(task), name or "nnx")


# ---------------------------------------------------------------------------- built-in models

def _dense_init(key, fan_in: int, fan_out: int, zeros: bool, use_bias: bool):
  if zeros:
    kernel = jnp.zeros((fan_in, fan_out), jnp.float32)
  else:  # LeCun normal, as flax.linen.Dense
    kernel = jax.random.normal(key, (fan_in, fan_out), jnp.float32) / jnp.sqrt(fan_in)
  layer = {"kernel": kernel}
  if use_bias:
    layer["bias"] = jnp.zeros((fan_out,), jnp.float32)
  return layer


def _dense(layer, x):
  y = x @ layer["kernel"]
  return y + layer["bias"] if "bias" in layer else y


def _linear_model(num_features: int, num_outputs: int, task: str, name: str, use_bias: bool,
                  zero_init: bool) -> Model:
  positive_int("num_features", num_features)
  def init(key):
    return _dense_init(key, num_features, num_outputs, zero_init, use_bias)
  def apply(params, x):
    out = _dense(params, x.reshape(x.shape[0], -1))
    return out[:, 0] if num_outputs == 1 else out
  return Model(init, apply, task, name)


def linear_regression(num_features: int, use_bias: bool = True, zero_init: bool = True) -> Model:
  """``ŷ = w·x (+ b)`` with loss ``½ (ŷ − y)²``; weights start at zero by default."""
  return _linear_model(num_features, 1, "regression", "linear_regression", use_bias, zero_init)


def logistic_regression(num_features: int, use_bias: bool = True, zero_init: bool = True) -> Model:
  """Binary logistic regression ``P(y=1) = σ(w·x (+ b))`` with cross-entropy loss."""
  return _linear_model(num_features, 1, "binary", "logistic_regression", use_bias, zero_init)


def softmax_regression(num_features: int, num_classes: int, use_bias: bool = True,
                       zero_init: bool = True) -> Model:
  """Multinomial logistic regression ``softmax(x W (+ b))`` (FedProx's synthetic-data model)."""
  positive_int("num_classes", num_classes)
  return _linear_model(num_features, num_classes, "multiclass", "softmax_regression", use_bias,
                       zero_init)


def mlp(num_features: int, hidden_sizes: Sequence[int] = (200, 200), num_classes: int = 10,
        use_bias: bool = True) -> Model:
  """Fully connected ReLU network; the default is McMahan et al.'s 2NN (784-200-200-10 has
  199,210 parameters). ``num_classes=1`` makes a binary classifier."""
  sizes = [num_features, *hidden_sizes, num_classes]
  for s in sizes:
    positive_int("layer size", s)
  def init(key):
    keys = jax.random.split(key, len(sizes) - 1)
    return [_dense_init(k, a, b, False, use_bias) for k, a, b in zip(keys, sizes[:-1], sizes[1:])]
  def apply(params, x):
    h = x.reshape(x.shape[0], -1)
    for layer in params[:-1]:
      h = jax.nn.relu(_dense(layer, h))
    out = _dense(params[-1], h)
    return out[:, 0] if num_classes == 1 else out
  name = "mlp_" + "-".join(str(s) for s in sizes)
  return Model(init, apply, "binary" if num_classes == 1 else "multiclass", name)


def cnn(input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10,
        conv_features: Sequence[int] = (32, 64), dense_size: int = 512,
        use_bias: bool = True) -> Model:
  """McMahan et al.'s CNN: two 5×5 SAME convolutions (32, 64 channels) each followed by ReLU and
  2×2 max-pooling, a 512-unit ReLU dense layer and a softmax layer (1,663,370 parameters for
  28×28×1 inputs). Inputs are ``[batch, H, W, C]`` (``[batch, H*W*C]`` is reshaped)."""
  import flax.linen as nn
  input_shape = tuple(int(s) for s in input_shape)

  class _CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = x.reshape((x.shape[0], *input_shape))
      for f in conv_features:
        x = nn.Conv(f, (5, 5), padding="SAME", use_bias=use_bias)(x)
        x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
      x = nn.relu(nn.Dense(dense_size, use_bias=use_bias)(x.reshape((x.shape[0], -1))))
      return nn.Dense(num_classes, use_bias=use_bias)(x)

  return from_linen(_CNN(), jnp.zeros((1, *input_shape), jnp.float32), "multiclass", "cnn")


def num_params(params: Params) -> int:
  """Total number of scalars in a parameter pytree."""
  return sum(int(p.size) for p in jax.tree.leaves(params))
