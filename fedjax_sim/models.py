"""Models: a pure ``init`` / ``apply`` pair plus the task that fixes the loss and the metrics.

A :class:`Model` is what the engine trains. The built-in models are the ones federated-learning
papers use (linear, logistic and softmax regression; McMahan et al.'s 2NN, CNN and Shakespeare
LSTM). Any Flax module plugs in through :func:`from_linen` (``flax.linen``) or :func:`from_nnx`
(``flax.nnx``); any other pure function pair through :func:`from_functions`.

Tasks and their per-example losses:

* ``"regression"``: scalar output ``ŷ``, loss ``½ (ŷ − y)²`` (so the gradient of ``ŷ = w·x`` is
  ``(w·x − y) x``, the convention of the worked example in the references);
* ``"binary"``: one logit ``z``, loss is the binary cross-entropy of ``σ(z)``, accuracy of ``z > 0``;
* ``"multiclass"``: ``num_classes`` logits, softmax cross-entropy, accuracy of the arg-max.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax

from fedjax_sim._checks import positive_int

Params = Any
TASKS = ("regression", "binary", "multiclass")


class Model(NamedTuple):
  """A trainable model.

  Attributes:
    init: ``init(key) -> params`` (a pytree).
    apply: ``apply(params, x) -> outputs`` for a batch ``x`` of shape ``[batch, *feature_shape]``.
    task: one of ``"regression"``, ``"binary"``, ``"multiclass"`` (the metrics; and the loss unless
      ``loss_fn`` is given).
    name: a short human-readable name.
    loss_fn: optional ``fn(outputs, y) -> [batch]`` per-example loss replacing the task's.
    represent: optional ``fn(params, x) -> [batch, dim]`` representation (e.g. a projection head)
      for representation-level objectives such as MOON's; default the outputs.
    train_apply: optional training-mode forward pass ``fn(params, x, *, key, mask) -> (outputs,
      updated)`` for models whose training differs from evaluation (dropout, batch
      normalization): ``key`` drives dropout, ``mask`` (``[batch]``) marks the batch's real
      examples (padding must not enter batch statistics), and ``updated`` maps each
      non-trainable collection of ``state_collections`` to its new value (batch statistics).
      ``None``: ``apply`` trains.
    state_collections: top-level keys of ``params`` that are not trained by gradients but
      replaced by ``train_apply``'s ``updated`` (e.g. ``("batch_stats",)``); ``params`` is then a
      dict of collections (``{"params": ..., "batch_stats": ...}``).
  """
  init: Callable[[jax.Array], Params]
  apply: Callable[[Params, jax.Array], jax.Array]
  task: str
  name: str = "model"
  loss_fn: Callable | None = None
  represent: Callable | None = None
  train_apply: Callable | None = None
  state_collections: tuple = ()

  def per_example_loss(self, params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Loss of each example, shape ``[batch]``."""
    return self._losses(self.apply(params, x), y)

  def _losses(self, out: jax.Array, y: jax.Array) -> jax.Array:
    return self.loss_fn(out, y) if self.loss_fn is not None else loss_from_outputs(
        self.task, out, y)

  def train_loss(self, params: Params, x: jax.Array, y: jax.Array, mask: jax.Array, *,
                 key: jax.Array):
    """``(mean loss over the real examples, updated collections)`` of a training-mode forward
    pass (:attr:`train_apply`; the plain loss and ``{}`` for a model without one)."""
    if self.train_apply is None:
      return self.loss(params, x, y, mask), {}
    out, updated = self.train_apply(params, x, key=key, mask=mask)
    return _masked_mean(self._losses(out, y), mask), updated

  @property
  def stochastic(self) -> bool:
    """Training differs from evaluation (dropout or batch statistics)."""
    return self.train_apply is not None

  def representation(self, params: Params, x: jax.Array) -> jax.Array:
    """``represent(params, x)``, or the outputs when the model has no representation function."""
    out = (self.represent or self.apply)(params, x)
    return out.reshape(out.shape[0], -1)

  def loss(self, params: Params, x: jax.Array, y: jax.Array, mask: jax.Array | None = None):
    """Mean loss over the real examples of a batch (``mask`` marks them; all when ``None``)."""
    losses = self.per_example_loss(params, x, y)
    return jnp.mean(losses) if mask is None else _masked_mean(losses, mask)

  def correct(self, params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """1.0 where the prediction is right (classifiers only), shape ``[batch]``."""
    return correct_from_outputs(self.task, self.apply(params, x), y)

  @property
  def is_classifier(self) -> bool:
    return self.task != "regression"


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


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


def from_functions(init: Callable, apply: Callable, task: str, name: str = "custom",
                   loss: Callable | None = None, represent: Callable | None = None) -> Model:
  """Wraps any pure ``init(key) -> params`` and ``apply(params, x) -> outputs`` pair.

  Args:
    loss: optional ``fn(outputs, y) -> [batch]`` per-example loss (default: the task's).
    represent: optional ``fn(params, x) -> [batch, dim]`` representation (see :class:`Model`).
  """
  if loss is not None and not callable(loss):
    raise ValueError(f"loss must be a function of (outputs, y), got {type(loss).__name__}")
  return Model(init, apply, _check_task(task), name, loss, represent)


# ``__call__`` arguments that switch a linen module between training and evaluation, with the
# value each takes in training.
TRAIN_ARGS = {"train": True, "training": True, "deterministic": False}
STATE_COLLECTIONS = ("batch_stats",)


def _train_arg(module) -> str | None:
  import inspect
  params = inspect.signature(type(module).__call__).parameters
  found = [a for a in TRAIN_ARGS if a in params]
  return found[0] if found else None


def _batch_norm_mask(mask: jax.Array):
  """A linen method interceptor that gives every ``BatchNorm`` the batch's ``mask`` (``[batch]``,
  broadcast over the other axes), so that padding rows never enter batch statistics."""
  import flax.linen as nn
  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
      x = args[0]
      kwargs = {**kwargs, "mask": jnp.broadcast_to(mask.reshape(-1, *[1] * (x.ndim - 1)), x.shape)}
    return next_fun(*args, **kwargs)
  return interceptor


def from_linen(module, example_x, task: str, name: str | None = None) -> Model:
  """Adapts a ``flax.linen`` module: params are ``module.init(key, x)["params"]``.

  Dropout and batch normalization: if ``module.__call__`` takes a ``train`` (or ``training``, or
  ``deterministic``) argument, evaluation calls it in evaluation mode and local training in
  training mode, with a fresh ``"dropout"`` key for every local step (drawn from the client's
  key). A module with batch statistics then has params ``{"params": ..., "batch_stats": ...}``:
  each training step replaces the statistics by the ones its forward pass computed (no gradient
  step touches them), and the server averages them with the cohort's weights (see
  :func:`fedjax_sim.simulate`'s ``local_params`` to keep them on each client instead, FedBN).

  Args:
    module: the linen module; ``module.apply({"params": p}, x)`` must return the outputs.
    example_x: one batch of inputs (any batch size) used to trace the parameter shapes.
    task: ``"regression"``, ``"binary"`` or ``"multiclass"``.

  Raises:
    ValueError: the module fails on ``example_x``, or holds randomness or state it cannot be
      trained with (dropout or batch statistics without a train argument, a mutable collection
      other than ``batch_stats``), naming what is unsupported.
  """
  import flax.linen as nn
  example_x = jnp.asarray(example_x)
  name = name or type(module).__name__
  arg = _train_arg(module)
  mode = lambda train: {} if arg is None else {arg: train == TRAIN_ARGS[arg]}
  try:
    shapes = jax.eval_shape(lambda k: module.init(k, example_x, **mode(False)), jax.random.key(0))
  except Exception as e:  # flax's own message says what failed (e.g. Dropout's deterministic)
    hint = ("" if arg is not None else
            "; a module with Dropout or BatchNorm must take a `train` argument in __call__ that "
            "switches them (nn.Dropout(rate, deterministic=not train), "
            "nn.BatchNorm(use_running_average=not train))")
    raise ValueError(f"from_linen: module {name!r} fails on example_x of shape "
                     f"{tuple(example_x.shape)}: {e}{hint}") from None
  collections = tuple(c for c in shapes if c != "params")
  unsupported = [c for c in collections if c not in STATE_COLLECTIONS]
  if unsupported:
    raise ValueError(f"from_linen: module {name!r} has mutable collection(s) {unsupported}; only "
                     f"{list(STATE_COLLECTIONS)} (batch normalization) can be trained")
  if collections and arg is None:
    raise ValueError(f"from_linen: module {name!r} has batch statistics but its __call__ takes "
                     f"no `train` argument to switch them between training and evaluation")
  if arg is None:
    return Model(lambda key: module.init(key, example_x)["params"],
                 lambda params, x: module.apply({"params": params}, x), _check_task(task), name)
  variables = (lambda p: p) if collections else (lambda p: {"params": p})
  def init(key):
    out = module.init(key, example_x, **mode(False))
    return dict(out) if collections else out["params"]
  def apply(params, x):
    return module.apply(variables(params), x, **mode(False))
  def train_apply(params, x, *, key, mask=None):
    def call():
      if not collections:
        return module.apply(variables(params), x, **mode(True), rngs={"dropout": key}), {}
      out, updated = module.apply(variables(params), x, **mode(True), rngs={"dropout": key},
                                  mutable=list(collections))
      return out, dict(updated)
    if mask is None:
      return call()
    with nn.intercept_methods(_batch_norm_mask(mask)):
      return call()
  return Model(init, apply, _check_task(task), name, train_apply=train_apply,
               state_collections=collections)


def from_nnx(make_module: Callable, task: str, name: str | None = None) -> Model:
  """Adapts a ``flax.nnx`` module built by ``make_module(rngs)``.

  Params are the module's ``nnx.Param`` state as a plain nested dict; ``apply`` merges them back
  into the module's graph (``nnx.merge``) inside the compiled computation, so vmap over clients works.
  """
  from flax import nnx
  graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: make_module(nnx.Rngs(0))))
  other = sorted({type(v).__name__ for _, v in nnx.to_flat_state(abstract_state)
                  if not isinstance(v, nnx.Param)})
  if other:
    raise ValueError(f"from_nnx: the module holds state other than nnx.Param ({', '.join(other)}: "
                     "dropout or batch normalization), which from_nnx cannot train; write the "
                     "model with flax.linen and a `train` argument, and use from_linen")
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


# Kernels up to this many entries get the CPU weight-gradient rule of :func:`_matmul` (measured
# faster for a 60→10 softmax regression; the 2NN's 784→200 and 200→200 layers, whose dots are
# large enough for XLA:CPU's default path, measured about 5 % slower with it and keep the plain one).
_TRANSPOSED_GRAD_MAX_KERNEL = 16384


@jax.custom_jvp
def _matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``x @ kernel`` whose kernel gradient, on the CPU backend, multiplies a materialized ``xᵀ``.

  The kernel's gradient is ``∂L/∂W = xᵀ g`` (``g = ∂L/∂y``, ``[batch, out]``). Derived from the
  plain product, XLA computes it as a dot that contracts ``x``'s leading (batch) dimension, which
  XLA:CPU's fast dot path (YNNPACK) does not take, so every local step of a vmapped chunk ran it
  as a slower batched Eigen dot. Here the kernel's tangent is multiplied by ``(xᵀ)ᵀ``, where
  ``xᵀ`` is a real transposed copy (an ``optimization_barrier`` keeps XLA from folding the
  transpose back into the dot), so the transposed rule is ``xᵀ · g``: a row-major
  ``[in, batch] · [batch, out]`` dot that takes the fast path (15–24 % less per local step of
  the 60→10 softmax regression in chunks of 4–32 clients, docs/design.md item 18). It is the same
  product summed in another kernel's order: for 60→10 with batches of 10 the gradients were bit for
  bit the plain product's (FedProx Figure 2's curves are unchanged), for other shapes they may
  differ in the last bits (16→8: up to 4e-5 relative). Other backends, kernels of more than
  ``_TRANSPOSED_GRAD_MAX_KERNEL`` entries, and evaluation (no derivative) keep the plain product.
  """
  return x @ kernel


@functools.partial(_matmul.defjvp, symbolic_zeros=True)
def _matmul_jvp(primals, tangents):
  x, kernel = primals
  dx, dkernel = tangents
  out = x @ kernel
  zero = lambda t: isinstance(t, jax.custom_derivatives.SymbolicZero)
  terms = [] if zero(dx) else [dx @ kernel]
  if not zero(dkernel):
    small = kernel.shape[-2] * kernel.shape[-1] <= _TRANSPOSED_GRAD_MAX_KERNEL
    if jax.default_backend() == "cpu" and x.ndim >= 2 and small:
      x_t = lax.optimization_barrier(jnp.swapaxes(x, -1, -2))
      terms.append(jnp.swapaxes(x_t, -1, -2) @ dkernel)
    else:
      terms.append(x @ dkernel)
  if not terms:
    return out, jnp.zeros_like(out)
  return out, terms[0] if len(terms) == 1 else terms[0] + terms[1]


def _dense(layer, x):
  y = _matmul(x, layer["kernel"])
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


# Character ids of the Shakespeare next-character task: id 0 is padding (see shakespeare_lstm).
SHAKESPEARE_PAD_ID = 0


def _lstm_layer_init(key, fan_in: int, hidden: int, peepholes: bool):
  """One LSTM layer, gates stacked in the order input, forget, cell, output along the last axis.

  ``w_x`` is LeCun normal, ``w_h`` one orthogonal ``[hidden, hidden]`` block per gate, the bias is
  zero except 1.0 for the forget gate (the forget bias TF's and Haiku's LSTMs add), and the
  optional peephole weights (rows: input, forget, output gate) start at zero.
  """
  kx, kh = jax.random.split(key)
  w_x = jax.random.normal(kx, (fan_in, 4 * hidden), jnp.float32) / jnp.sqrt(fan_in)
  orthogonal = jax.nn.initializers.orthogonal()
  w_h = jnp.concatenate([orthogonal(k, (hidden, hidden), jnp.float32)
                         for k in jax.random.split(kh, 4)], axis=1)
  bias = jnp.zeros((4 * hidden,), jnp.float32).at[hidden:2 * hidden].set(1.0)
  layer = {"w_x": w_x, "w_h": w_h, "bias": bias}
  if peepholes:
    layer["peephole"] = jnp.zeros((3, hidden), jnp.float32)
  return layer


def _lstm_layer(layer, inputs: jax.Array, keep: jax.Array) -> jax.Array:
  """Runs one LSTM layer over time-major ``inputs`` ``[T, batch, d]``; returns ``[T, batch, H]``.

  Where ``keep[t, b]`` is False the state of row ``b`` passes step ``t`` unchanged.
  """
  hidden = layer["w_h"].shape[0]
  # The input projection of every step at once (one matmul), only the recurrence in the scan.
  projected = inputs @ layer["w_x"] + layer["bias"]
  peep = layer.get("peephole")

  def step(carry, xs):
    h, c = carry
    z, k = xs
    z = z + h @ layer["w_h"]
    zi, zf, zg, zo = (z[:, j * hidden:(j + 1) * hidden] for j in range(4))
    if peep is not None:
      zi, zf = zi + peep[0] * c, zf + peep[1] * c
    c_new = jax.nn.sigmoid(zf) * c + jax.nn.sigmoid(zi) * jnp.tanh(zg)
    if peep is not None:
      zo = zo + peep[2] * c_new
    h_new = jax.nn.sigmoid(zo) * jnp.tanh(c_new)
    k = k[:, None]
    h, c = jnp.where(k, h_new, h), jnp.where(k, c_new, c)
    return (h, c), h

  zeros = jnp.zeros((inputs.shape[1], hidden), projected.dtype)
  _, hs = jax.lax.scan(step, (zeros, zeros), (projected, keep))
  return hs


def shakespeare_lstm(vocab_size: int = 82, embed_dim: int = 8, hidden: int = 256,
                     num_layers: int = 2, seq_len: int | None = 80,
                     peepholes: bool = False) -> Model:
  """McMahan et al.'s Shakespeare next-character LSTM (arXiv:1602.05629, §3).

  A learned ``embed_dim``-dimensional character embedding, ``num_layers`` LSTM layers of ``hidden``
  units and a dense softmax layer over the ``vocab_size`` ids, read at the last position: the
  LEAF Shakespeare task of predicting the character that follows an 80-character window.

  Data: ``x`` is an integer array ``[batch, seq_len]`` of character ids in ``[0, vocab_size)``,
  ``0`` being padding; ``y`` is the id of the next character (task ``"multiclass"``, so the
  standard loss, accuracy and evaluation apply). The default ``vocab_size=82`` is the encoding of
  :func:`fedjax_sim.datasets.leaf.load_leaf` with ``text="shakespeare"``: padding, LEAF's 80
  characters, and one out-of-vocabulary id. Padding is *masked*, not embedded: at a pad position
  every layer carries its state over unchanged, so a window right- or left-padded to ``seq_len``
  gives exactly the prediction of the unpadded shorter window (an all-padding row sees only the
  output bias). The embedding row of id 0 is kept (and counted) but never trained.

  Out-of-range ids: calling ``apply`` on concrete arrays raises ``ValueError`` naming the bad id.
  Inside ``jit`` / ``vmap`` (as in :func:`fedjax_sim.simulate`) values cannot be checked, so an id
  outside ``[0, vocab_size)`` turns its row's embedding into NaN; the loss and the parameters
  become NaN and ``simulate`` stops with ``TrainingDiverged``. Validate ids when loading data.
  Non-integer ``x`` raises ``TypeError`` and a sequence length other than ``seq_len`` raises
  ``ValueError`` when traced (``simulate`` reports both as a ``DataError`` before training).

  Parameter count: ``V·e + Σ_layers 4·(d_in + H + 1)·H + (H + 1)·V`` (``+ 3·H`` per layer with
  ``peepholes``): 818,402 for the defaults. FedJAX's ``create_lstm_model`` (86 characters plus
  padding, BOS, EOS and OOV: ``vocab_size=90``) has 820,522; LEAF's model (80 letters, no
  padding id: ``vocab_size=80``) 817,872. No vocabulary size gives the paper's 866,578 with this
  standard cell; ``vocab_size=258, peepholes=True`` (e.g. 256 byte values + 2, with the peephole
  cell of TF's ``LSTMCell``) is the only combination of standard layer variants we found that
  gives exactly 866,578 — an arithmetic reconstruction: the paper states neither its vocabulary
  nor its cell variant.

  Implementation: pure JAX, one ``lax.scan`` per layer with the input projection hoisted out of
  the loop. Measured on a shared 2-core CPU (one jitted SGD step, ``[16, 80]`` batch, defaults,
  medians of two interleaved runs): compile 1.6–1.8 s and 190–210 ms a step, against 2.2–2.5 s
  and 175–200 ms for ``flax.linen`` ``nn.RNN`` over ``nn.LSTMCell`` or ``nn.OptimizedLSTMCell``.
  Steps are equal within the machine's noise; pure JAX was kept for its faster compile, its pad
  masking (``nn.RNN``'s ``seq_lengths`` handles right padding only) and the peephole option.

  Args:
    vocab_size: number of ids, padding and special tokens included (= number of output classes).
    embed_dim: character embedding size (8 in the paper).
    hidden: units per LSTM layer (256 in the paper).
    num_layers: stacked LSTM layers (2 in the paper).
    seq_len: required input length (80 in the paper and LEAF); ``None`` accepts any length.
    peepholes: add TF-style peephole connections (diagonal cell-to-gate weights).
  """
  vocab_size = positive_int("vocab_size", vocab_size)
  embed_dim = positive_int("embed_dim", embed_dim)
  hidden = positive_int("hidden", hidden)
  num_layers = positive_int("num_layers", num_layers)
  if seq_len is not None:
    seq_len = positive_int("seq_len", seq_len)

  def init(key):
    k_embed, k_out, *k_layers = jax.random.split(key, num_layers + 2)
    fan_ins = [embed_dim] + [hidden] * (num_layers - 1)
    return {
        "embed": jax.random.normal(k_embed, (vocab_size, embed_dim), jnp.float32),
        "lstm": [_lstm_layer_init(k, d, hidden, peepholes) for k, d in zip(k_layers, fan_ins)],
        "out": _dense_init(k_out, hidden, vocab_size, False, True),
    }

  def apply(params, x):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise TypeError(f"shakespeare_lstm expects integer character ids, got dtype {x.dtype}")
    if x.ndim != 2 or (seq_len is not None and x.shape[1] != seq_len):
      expected = f"[batch, {seq_len}]" if seq_len is not None else "[batch, length]"
      raise ValueError(f"shakespeare_lstm expects ids of shape {expected}, got {tuple(x.shape)}")
    if not isinstance(x, jax.core.Tracer):  # concrete ids: check them here, with a clear message
      ids = np.asarray(x)
      bad = (ids < 0) | (ids >= vocab_size)
      if bad.any():
        value = int(ids[bad][0])
        raise ValueError(f"character id {value} is outside [0, {vocab_size}) (vocab_size="
                         f"{vocab_size}); the ids of the data and the model's vocabulary disagree")
    valid = (x >= 0) & (x < vocab_size)
    emb = jnp.take(params["embed"], jnp.clip(x, 0, vocab_size - 1), axis=0)
    emb = jnp.where(valid[..., None], emb, jnp.nan)
    h = jnp.swapaxes(emb, 0, 1)  # time-major [T, batch, e]
    keep = jnp.swapaxes(x != SHAKESPEARE_PAD_ID, 0, 1)
    for layer in params["lstm"]:
      h = _lstm_layer(layer, h, keep)
    return _dense(params["out"], h[-1])

  name = f"shakespeare_lstm_{vocab_size}v_{embed_dim}e_{num_layers}x{hidden}"
  return Model(init, apply, "multiclass", name + ("_peephole" if peepholes else ""))


def num_params(params: Params) -> int:
  """Total number of scalars in a parameter pytree."""
  return sum(int(p.size) for p in jax.tree.leaves(params))
