"""Trains an in-distribution classifier for the OOD benchmarks: `python -m line_jax.train`.

    python -m line_jax.train --out /tmp/fmnist_resnet --epochs 5
    python -m line_jax.train --out DIR --dataset path/to/imagefolder --image-size 32

Data sets are named as in every line_jax CLI: 'fashion_mnist' reads Debian's
files (`dataset-fashion-mnist`), 'tfds:NAME' a prepared TFDS set, or a
folder; nothing is downloaded. AdamW with warmup and cosine decay; the
checkpoint (orbax weights and `config.json`) is what every other CLI's
`--checkpoint` takes. A shell over `line_jax.runs.train`.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import sys

from line_jax import _cli
from line_jax import models
from line_jax.runs import train


def _parser():
  p = _cli.parser("python -m line_jax.train", __doc__)
  defaults = train.TrainConfig()
  p.add_argument("--out", required=True, help="checkpoint folder, replaced once trained "
                 f"if it holds one; {_cli.OUT_RULE}")
  p.add_argument("--model", default=defaults.model, choices=sorted(models.registry),
                 help="a line_jax.models registry name")
  p.add_argument("--dataset", default=defaults.dataset, help=_cli.DATASET_HELP)
  p.add_argument("--image-size", type=int, default=None,
                 help="resize and center-crop to this square; none: as stored")
  p.add_argument("--channels", type=int, default=None, choices=(1, 3),
                 help="1 grayscale, 3 RGB; none: the first image's")
  p.add_argument("--epochs", type=int, default=defaults.epochs, help="passes over the data")
  p.add_argument("--batch-size", type=int, default=defaults.batch_size,
                 help="images per step (the last partial batch of an epoch is dropped)")
  p.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
  p.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                 help="AdamW's decoupled weight decay")
  p.add_argument("--seed", type=int, default=defaults.seed,
                 help="initialisation, shuffle and augmentation")
  p.add_argument("--max-examples", type=int, default=None,
                 help=f"only N images of each split: {_cli.SUBSET_RULE}")
  p.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding threads")
  _cli.add_skip_bad_images(p)
  _cli.add_common(p)
  return p


def main(argv: Sequence[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  with _cli.user_errors():
    config = train.TrainConfig(model=args.model, dataset=args.dataset, epochs=args.epochs,
                               batch_size=args.batch_size, lr=args.lr,
                               weight_decay=args.weight_decay, seed=args.seed,
                               image_size=args.image_size, channels=args.channels,
                               max_examples=args.max_examples,
                               skip_bad_images=args.skip_bad_images)
    metrics = train.run(config, args.out, runtime=_cli.runtime(args))
  result = f"final loss {metrics['final_loss']:.4f}"
  if "test_accuracy" in metrics:
    result += f", test accuracy {metrics['test_accuracy']:.4f}"
  print(f"{result}; wrote {args.out}", file=sys.stdout)


if __name__ == "__main__":
  main()
