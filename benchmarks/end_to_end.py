"""End to end, images -> scores: the backbone plus Energy or LINe.

For each backbone (`benchmarks.backbones`: ResNet-18 CIFAR at 32 x 32,
ResNet-50 at 224 x 224, random weights, identical in both frameworks) and
one batch of identical images:

* "line_jax_energy" / "line_jax_line": one jitted function, network ->
  features -> scorer (Energy: `logsumexp` of the logits; LINe:
  `line_jax.line.score` with its default strategy for the backend), the
  network run as the extraction runs it (the layout's passes and network
  compiler options, `line_jax.layout`).
* "torch_energy": the PyTorch network and `logsumexp`;
  "torch_line_official": the network, then the official-style scorer
  (`OfficialLine`: per-sample loop, host argmax; masks of the classes the
  batch predicts are built in the untimed warm-up);
  "torch_line_fast": the network, then the fastest PyTorch LINe we have
  (`FastTorchLine`, grouped by predicted class). PyTorch runs in
  `inference_mode`, channels_last.

With `bf16`, both backbones compute in bfloat16 (Flax `dtype`, PyTorch
`autocast`); features and scorers stay float32. Goal: LINe keeps >= 0.95x
Energy's images/s (the scorer is cheap next to the network).
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np

from benchmarks import backbones
from benchmarks import timing


def _jax_fns(bb: backbones.Backbone, images: np.ndarray) -> dict:
  # The network as line_jax's extraction runs it: the layout's passes, the
  # network compiler options.
  from line_jax import layout
  from line_jax import line
  from line_jax.features import _extract
  model = bb.model
  per_pass = layout.default().images_per_pass(*images.shape[:3])

  def outputs(variables, x):
    return _extract.forward_in_passes(model.apply, variables, x, per_pass)

  @layout.network_jit
  def energy(variables, x):
    logits, _ = outputs(variables, x)
    return jax.nn.logsumexp(logits, axis=-1)

  @layout.network_jit
  def line_scores(variables, state, x):
    _, features = outputs(variables, x)
    return line.score(state, features)

  x = jax.device_put(images)
  variables, state = jax.device_put(bb.variables), jax.device_put(bb.state)
  return {
      "line_jax_energy": lambda: energy(variables, x).block_until_ready(),
      "line_jax_line": lambda: line_scores(variables, state, x).block_until_ready(),
  }


def _torch_fns(bb: backbones.Backbone, images: np.ndarray, bf16: bool) -> dict:
  import torch
  from benchmarks import torch_reference
  device = "cuda" if torch.cuda.is_available() else "cpu"
  net = bb.net.to(device, memory_format=torch.channels_last).eval()
  x = torch.from_numpy(images.transpose(0, 3, 1, 2)).to(device)
  x = x.contiguous(memory_format=torch.channels_last)
  autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  p_w, p_a, clip = bb.hparams
  weight, bias = np.array(bb.kernel.T), np.array(bb.bias)  # writable copies for torch
  official = torch_reference.OfficialLine(weight, bias, bb.contrib, p_w=p_w, p_a=p_a, clip=clip,
                                          lazy=True, device=device)
  fast = torch_reference.FastTorchLine(weight, bias, clip, np.array(bb.state.weight_floor),
                                       np.array(bb.state.neuron_mask), device=device)

  def run(scorer):
    def call():
      with torch.inference_mode():
        with autocast():
          logits, features = net(x)
        scorer(logits.float(), features.float())
      sync()
    return call

  return {
      "torch_energy": run(lambda logits, _: torch.logsumexp(logits, dim=1)),
      "torch_line_official": run(lambda _, h: official(h)),
      "torch_line_fast": run(lambda _, h: fast(h)),
  }


def measure(name: str, batch: int, *, rounds: int = 5, bf16: bool = False,
            with_torch: bool = True, official: bool = True) -> list[dict]:
  """images/s of every implementation on one backbone and batch.

  The implementations alternate call by call (`rounds` calls each, median),
  so a shared machine's changing load hits them alike.

  Args:
    name: a key of `backbones.SPECS`.
    batch: images per call.
    rounds: timed calls per implementation.
    bf16: bfloat16 backbones (scorers stay float32).
    with_torch: also measure PyTorch.
    official: include the official-style PyTorch LINe.

  Returns:
    `what="end_to_end"` records with model, image_size, classes, features,
    batch, dtype, implementation, samples_per_s, seconds.
  """
  bb = backbones.build(name, bf16=bf16)
  images = bb.images(batch)
  fns = _jax_fns(bb, images)
  if with_torch:
    torch_fns = _torch_fns(bb, images, bf16)
    if not official:
      del torch_fns["torch_line_official"]
    fns.update(torch_fns)
  rates = timing.interleaved_rates(list(fns.values()), batch, repeats=1, rounds=rounds,
                                   settle_s=0.0, wake=False)
  base = dict(what="end_to_end", model=name, image_size=bb.image_size, classes=bb.num_classes,
              features=bb.kernel.shape[0], batch=batch, dtype="bfloat16" if bf16 else "float32")
  return [dict(base, implementation=impl, samples_per_s=rate, seconds=batch / rate)
          for impl, rate in zip(fns, rates)]
