"""What every `python -m line_jax.X` shares: one flag set, one way to fail.

* `parser`: usage as `python -m line_jax.X`, defaults and choices in `--help`;
* `add_data`, `add_skip_bad_images`, `add_cache`, `add_distributed`,
  `add_common`: the flags with one name and one default in every CLI;
* `runtime`: the flags as the `Runtime` every run takes; `network`,
  `benchmark_network`: `--checkpoint` / `--torch-checkpoint --arch` as the
  `runs.Network` a run reads;
* `user_errors`: a user's mistake is one `error: ...` line (exit 2), Ctrl-C
  says how to resume (exit 130), not a traceback.

The CLIs (`fit`, `evaluate`, `tune`, `train`) are argparse shells over
`line_jax.runs`; nothing below this layer imports it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
import contextlib
import json
import os
import sys

from line_jax import distributed
from line_jax import features
from line_jax import models
from line_jax import scorers
from line_jax.runs import Runtime

# The one rule every CLI takes part of a data set by (`line_jax.data.subset_of`).
SUBSET_RULE = "each class in proportion, evenly spaced (line_jax.data.subset_of)"
# Every CLI writes only where nothing of yours would be replaced.
OUT_RULE = "a folder holding other files is refused"
DATASET_HELP = ("'fashion_mnist' (Debian's files), 'tfds:NAME' (a prepared TFDS set), or a "
                "folder: images.npy + labels.npy, train/ and test/ class folders, or one "
                "ImageFolder")


class _Formatter(argparse.RawDescriptionHelpFormatter):
  """Shows every option's default and choices, help string or not."""

  def _get_help_string(self, action):
    text = action.help or ""
    if action.default is not argparse.SUPPRESS and action.option_strings and \
        "default" not in text and not isinstance(action, argparse._HelpAction):  # pylint: disable=protected-access
      text += (" " if text else "") + "(default: %(default)s)"
    return text


class _Parser(argparse.ArgumentParser):
  """A usage mistake is one `error: ...` line (exit 2), as every other user error."""

  def error(self, message: str):
    print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
    raise SystemExit(2)


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
  """An argparse parser named `prog`, described by the module docstring `doc`."""
  return _Parser(prog=prog, description=doc, formatter_class=_Formatter)


def add_data(p: argparse.ArgumentParser, *, scorers_default: str | None,
             scorers_help: str) -> None:
  """The flags every CLI that reads images shares, with one name and default each."""
  p.add_argument("--scorers", "--methods", dest="scorers", default=scorers_default,
                 help=f"comma-separated scorer names ({scorers_help})")
  p.add_argument("--checkpoint", default=models.DEFAULT_CHECKPOINT,
                 help="line_jax checkpoint folder")
  p.add_argument("--batch-size", type=int, default=features.IMAGES_PER_CALL,
                 help="images per model call")
  p.add_argument("--workers", type=int, default=None,
                 help="decoding threads (default: one per core)")
  add_skip_bad_images(p)


def add_network(p: argparse.ArgumentParser, *, arch_default: str | None = None) -> None:
  """`--torch-checkpoint PATH --arch NAME [--normalization KEY]`: a PyTorch
  state_dict of any network the import supports, instead of `--checkpoint`
  (`line_jax.runs.Network`)."""
  g = p.add_argument_group("a PyTorch network instead of --checkpoint")
  g.add_argument("--torch-checkpoint", default=None,
                 help="a PyTorch state_dict file (torchvision's, DICE's), read without pickle")
  g.add_argument("--arch", default=arch_default, choices=sorted(features.TORCH_INPUTS),
                 help="the network --torch-checkpoint holds")
  g.add_argument("--normalization", default=None,
                 help="line_jax.data.MEAN_STD key of --torch-checkpoint (default: what "
                      "--arch's published checkpoints were trained with)")


def network(args: argparse.Namespace):
  """The `line_jax.runs.Network` of `--checkpoint` / `--torch-checkpoint --arch`."""
  from line_jax.runs import Network  # pylint: disable=g-import-not-at-top
  if args.torch_checkpoint is None:
    return Network(checkpoint=args.checkpoint, normalization=args.normalization,
                   arch=args.arch)
  return Network(torch_checkpoint=args.torch_checkpoint, arch=args.arch,
                 normalization=args.normalization)


def benchmark_network(args: argparse.Namespace) -> dict:
  """evaluate's network as `BenchmarkData` fields: a paper benchmark's own
  (`--torch-checkpoint` alone, `Suite.model`), else yours (`--checkpoint`, or
  `--torch-checkpoint --arch`: `network`)."""
  given = os.path.abspath(args.checkpoint) != os.path.abspath(models.DEFAULT_CHECKPOINT)
  if not (args.benchmark.startswith("fashion_mnist") or given or args.arch
          or args.normalization):
    return {"torch_checkpoint": args.torch_checkpoint}
  return {"checkpoint": args.checkpoint, "network": network(args)}


def add_skip_bad_images(p: argparse.ArgumentParser) -> None:
  """`--skip-bad-images`: part of what a run computes (its config), not how it runs."""
  p.add_argument("--skip-bad-images", action="store_true",
                 help="drop images that cannot be decoded (listed in the output and on "
                      "stderr) instead of stopping at the first")


def add_openood(p: argparse.ArgumentParser) -> None:
  """The flags of an OpenOOD protocol (`--benchmark openood_cifar10`)."""
  g = p.add_argument_group("OpenOOD protocol (--benchmark openood_cifar10 --data-dir "
                           "DIR: OpenOOD's images_classic/ with benchmark_imglist/)")
  g.add_argument("--arch", default=None,
                 help="network of --torch-checkpoint (default: the benchmark's, densenet100)")
  g.add_argument("--normalization", default=None,
                 help="line_jax.data.MEAN_STD key of --torch-checkpoint (default: what "
                      "that network was trained with: cifar_line for DICE's densenet100, "
                      "else OpenOOD's cifar10)")
  g.add_argument("--partial-sets", action="store_true",
                 help="use the present images of a list with some absent (counted in "
                      "every output) instead of refusing it")
  for group in ("near", "far"):
    g.add_argument(f"--{group}", action="append", default=[], metavar="NAME=PATH",
                   help=f"add a {group}-OOD set: a folder of images or a uint8 .npy; "
                        "repeatable")
  g.add_argument("--no-tune", action="store_true",
                 help="untuned rows only (no search on the validation lists)")


def add_common(p: argparse.ArgumentParser) -> None:
  p.add_argument("--quiet", action="store_true", help="no progress output")


def add_cache(p: argparse.ArgumentParser) -> None:
  p.add_argument("--cache-dir", default=features.cache.default_dir(),
                 help=f"feature cache shared by fit, tune and evaluate (${features.cache.ENV} "
                      "sets the default)")
  p.add_argument("--no-cache", action="store_true",
                 help="neither read nor write the feature cache")


def add_hparams(p: argparse.ArgumentParser, over: str) -> None:
  p.add_argument("--hparam", action="append", default=[],
                 help=f"SCORER.NAME=VALUE over {over} (a JSON value), repeatable")


def add_distributed(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("multi-host (run the same command in every process)")
  g.add_argument("--coordinator", default=None,
                 help="HOST:PORT of process 0; 'auto' lets JAX find its peers (Cloud TPU, "
                      "SLURM, Open MPI)")
  g.add_argument("--num-processes", type=int, default=None, help="processes in all")
  g.add_argument("--process-id", type=int, default=None, help="this process, 0-based")


def benchmark_of(argv: Sequence[str] | None) -> str | None:
  """The `--benchmark` value of a command line (None: not given), read
  before the full parse so a CLI can hand the run to the benchmark's own."""
  pre = argparse.ArgumentParser(add_help=False)
  pre.add_argument("--benchmark", default=None)
  return pre.parse_known_args(sys.argv[1:] if argv is None else argv)[0].benchmark


def init_distributed(args: argparse.Namespace) -> None:
  """`jax.distributed.initialize` from the flags, before anything touches JAX."""
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)


def runtime(args: argparse.Namespace) -> Runtime:
  """How the run runs: `--workers`, the cache flags, `--quiet`."""
  cache_dir = None if getattr(args, "no_cache", True) else args.cache_dir
  return Runtime(workers=args.workers, cache_dir=cache_dir, progress=not args.quiet)


@contextlib.contextmanager
def user_errors(*, resumable: bool = False) -> Iterator[None]:
  """Turns user errors into one line and exit code 2, Ctrl-C into a hint."""
  try:
    yield
  except (ValueError, FileNotFoundError, TypeError) as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from e
  except KeyboardInterrupt:
    hint = "; rerun the same command to resume" if resumable else ""
    print(f"interrupted{hint}", file=sys.stderr)
    raise SystemExit(130) from None


def scorer_names(spec: str) -> list[str]:
  """`"line,knn"` -> checked, distinct registered names."""
  names = [n.strip() for n in spec.split(",") if n.strip()]
  for name in names:
    scorers.get(name)  # Unknown names fail here, listing the valid ones.
  if not names or len(set(names)) != len(names):
    raise ValueError(f"--scorers must list distinct scorers, got {spec!r}")
  return names


def parse_hparams(specs: Sequence[str], names: Sequence[str] | None) -> dict[str, dict]:
  """`["knn.k=50", "line.p_w=90"]` -> `{"knn": {"k": 50}, "line": {"p_w": 90}}`,
  each for one of the requested scorers `names` (None: every registered one)."""
  names = scorers.names() if names is None else names
  hparams: dict[str, dict] = {}
  for spec in specs:
    key, sep, value = spec.partition("=")
    scorer, dot, name = key.partition(".")
    if not sep or not dot or scorer not in names:
      raise ValueError(f"--hparam expects SCORER.NAME=VALUE for a requested "
                       f"scorer, got {spec!r}")
    try:
      parsed = json.loads(value)
    except json.JSONDecodeError:
      parsed = value
    valid = scorers.get(scorer).defaults
    if name not in valid:
      raise ValueError(f"unknown hyperparameter {name!r} for scorer {scorer!r}; "
                       f"valid: {', '.join(valid) or 'none'}")
    hparams.setdefault(scorer, {})[name] = parsed
  return hparams
