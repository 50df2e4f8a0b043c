"""LINe on your own Flax model: a small CNN of yours, its head named, scored.

Your network needs no change: it returns logits as any classifier does, and
`head="classifier"` names its final Dense layer, whose input becomes the
features the scorers take (`line_jax.features.extract`) and whose kernel and
bias are the head (`line_jax.models.head_params`).

    python examples/own_flax_model.py                 # Fashion-MNIST if installed
    python examples/own_flax_model.py --random-data   # anywhere, no dataset

Fashion-MNIST comes from Debian's dataset-fashion-mnist files
(`line_jax.data.read_fashion_mnist`); the OOD sets are built offline
(`line_jax.data.ood_set`). Under a minute on a laptop CPU.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from line_jax import data
from line_jax import features
from line_jax import metrics
from line_jax import models
from line_jax import scorers

MEAN, STD = data.MEAN_STD["fashion_mnist"]
HEAD = "classifier"


class SmallCNN(nn.Module):
  """Yours: two conv blocks, a hidden Dense layer, a Dense head. Returns logits."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for width in (16, 32):
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes, name=HEAD)(x)


def load_data(random_data: bool, train_size: int, test_size: int, seed: int = 0):
  """`(train_images, train_labels, test_images)`: uint8 `[N, 28, 28, 1]`."""
  if not random_data:
    try:
      train, labels = data.read_fashion_mnist("train")
      test, _ = data.read_fashion_mnist("test")
      return train[:train_size, ..., None], labels[:train_size].astype(np.int32), \
          test[:test_size, ..., None]
    except FileNotFoundError as e:
      print(f"Fashion-MNIST not found ({e}); using random images instead")
  rng = np.random.default_rng(seed)
  # Ten classes that differ in brightness and position, so the CNN learns something.
  labels = rng.integers(0, 10, train_size + test_size).astype(np.int32)
  images = rng.integers(0, 64, (train_size + test_size, 28, 28, 1)).astype(np.uint8)
  for i, c in enumerate(labels):
    images[i, 2 * c:2 * c + 8, 4:24] += np.uint8(100 + 10 * c)
  return images[:train_size], labels[:train_size], images[train_size:]


def train(model: nn.Module, images: np.ndarray, labels: np.ndarray, steps: int,
          batch_size: int = 128, seed: int = 0):
  """A few hundred Adam steps of cross-entropy; returns the variables."""
  x = lambda batch: (jnp.asarray(batch, jnp.float32) / 255.0 - MEAN[0]) / STD[0]
  variables = model.init(jax.random.key(seed), x(images[:1]))
  optimizer = optax.adam(1e-3)
  opt_state = optimizer.init(variables)

  @jax.jit
  def step(variables, opt_state, batch, batch_labels):
    def loss(v):
      logits = model.apply(v, x(batch))
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch_labels).mean()
    value, grads = jax.value_and_grad(loss)(variables)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(variables, updates), opt_state, value

  rng = np.random.default_rng(seed)
  for i in range(steps):
    idx = rng.integers(0, len(images), batch_size)
    variables, opt_state, value = step(variables, opt_state, images[idx], labels[idx])
    if (i + 1) % max(1, steps // 4) == 0:
      print(f"  step {i + 1:4d}  loss {float(value):.3f}")
  return variables


def main(argv=None) -> dict[str, dict[str, float]]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--random-data", action="store_true", help="skip Fashion-MNIST")
  p.add_argument("--steps", type=int, default=300, help="training steps")
  p.add_argument("--train-size", type=int, default=10_000)
  p.add_argument("--test-size", type=int, default=2_000)
  p.add_argument("--ood", nargs="+", default=["letters", "gaussian"],
                 help="line_jax.data.ood_set names")
  args = p.parse_args(argv)
  start = time.perf_counter()

  train_images, train_labels, test_images = load_data(args.random_data, args.train_size,
                                                      args.test_size)
  model = SmallCNN()
  print(f"training {type(model).__name__} on {len(train_images)} images")
  variables = train(model, train_images, train_labels, args.steps)

  # Your model's features: the input of its head, named by `head=`.
  extract = lambda images: features.extract(model, variables, images, mean=MEAN, std=STD,
                                            head=HEAD, progress=False)
  train_logits, train_features = extract(train_images)
  kernel, bias = models.head_params(variables, head=HEAD)
  accuracy = float(np.mean(train_logits.argmax(1) == train_labels))
  print(f"features {train_features.shape}, head kernel {kernel.shape}, "
        f"train accuracy {accuracy:.3f}")

  _, test_features = extract(test_images)
  ood_features = {name: extract(data.ood_set(name, size=args.test_size))[1]
                  for name in args.ood}
  results = {}
  for name in ("line", "energy"):  # LINe with its defaults: clip at the 90th percentile
    scorer = scorers.get(name)
    state = scorer.fit(train_features, train_labels, kernel, bias)
    score_id = np.asarray(scorer.score(state, test_features))
    results[name] = {ood: metrics.auroc(score_id, np.asarray(scorer.score(state, f)))
                     for ood, f in ood_features.items()}
  for name, aurocs in results.items():
    print(f"{name:7s} AUROC " + "  ".join(f"{ood} {v:.3f}" for ood, v in aurocs.items()))
  print(f"done in {time.perf_counter() - start:.1f} s")
  return results


if __name__ == "__main__":
  main()
