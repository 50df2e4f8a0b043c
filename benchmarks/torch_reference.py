"""PyTorch references for LINe, written from ../shared/docs/line-algorithm.md.

* `official_contributions` and `OfficialLine` follow the official code's way of
  computing: one forward and backward pass per training image, float64 class
  means, per-class dense masked weights `[classes, classes, features]`, a
  Python loop over the batch with the argmax on the host. They are the
  independent reference the tests compare line_jax against.
* `FastTorchLine` is the fastest PyTorch version we could write, for the
  throughput benchmark: batch grouped by predicted class, one masked head per
  class present, precomputed heads where they fit in memory.
"""

from __future__ import annotations

import numpy as np
import torch


def official_contributions(features: np.ndarray, labels: np.ndarray, weight: np.ndarray,
                           bias: np.ndarray) -> np.ndarray:
  """Class means of `h * d logit_y / d h`, batch size 1, as the official precompute.

  Args:
    features: `[n, m]` float32 training features.
    labels: `[n]` integer labels.
    weight: `[C, m]` PyTorch-layout head weight.
    bias: `[C]` head bias.

  Returns:
    `[C, m]` float64 class means.
  """
  head = torch.nn.Linear(weight.shape[1], weight.shape[0])
  with torch.no_grad():
    head.weight.copy_(torch.from_numpy(np.asarray(weight, np.float32)))
    head.bias.copy_(torch.from_numpy(np.asarray(bias, np.float32)))
  shap_log = np.zeros(features.shape, np.float64)
  for i in range(features.shape[0]):
    h = torch.from_numpy(np.asarray(features[i:i + 1], np.float32)).requires_grad_(True)
    out = head(h)
    out[0, int(labels[i])].backward()
    shap_log[i] = (h * h.grad)[0].detach().numpy()
  num_classes = weight.shape[0]
  means = np.zeros((num_classes, features.shape[1]), np.float64)
  for c in range(num_classes):
    rows = shap_log[labels == c]
    means[c] = rows.sum(0) / len(rows)
  return means


class OfficialLine:
  """LINe scoring in the official code's style (per-sample loop, dense masks).

  Args:
    weight: `[C, m]` float32 head weight; bias: `[C]`.
    contrib: `[C, m]` float64 class-mean contributions.
    p_w, p_a: percentiles; clip: clipping threshold.
    lazy: build a class's `[C, m]` mask when first predicted instead of all
      `C` up front (the full `[C, C, m]` tensor is 7.6 GiB for ImageNet).
  """

  def __init__(self, weight, bias, contrib, *, p_w, p_a, clip, lazy=False, device="cpu"):
    self.device = device
    self.weight = torch.as_tensor(np.asarray(weight, np.float32), device=device)
    self.bias = torch.as_tensor(np.asarray(bias, np.float32), device=device)
    self.contrib = np.asarray(contrib, np.float64)
    self.p_w, self.p_a, self.clip = p_w, p_a, clip
    self.masked_w: dict[int, torch.Tensor] = {}
    self.mask_f: dict[int, torch.Tensor] = {}
    if not lazy:
      for c in range(self.weight.shape[0]):
        self._build(c)

  def _build(self, c: int) -> None:
    weight_np = self.weight.cpu().numpy()
    matrix = abs(self.contrib[c, :]) * weight_np  # float64 [C, m]
    mask_w = torch.Tensor(matrix > np.percentile(matrix, self.p_w)).to(self.device)
    self.masked_w[c] = self.weight * mask_w
    mask_f = torch.Tensor(self.contrib[c, :] > np.percentile(self.contrib[c, :], self.p_a))
    self.mask_f[c] = mask_f.to(self.device)

  def __call__(self, features) -> torch.Tensor:
    x = torch.as_tensor(features, device=self.device).clip(max=self.clip)
    with torch.no_grad():
      pre = x[:, None, :] * self.weight
      pred = torch.nn.functional.softmax(pre.sum(2) + self.bias, dim=1)
      preds = np.argmax(pred.cpu().numpy(), axis=1)  # host round trip, as the official code
      for c in set(preds.tolist()) - self.masked_w.keys():
        self._build(c)
      cp = torch.zeros((len(x), x.shape[1]), device=self.device)
      for i, c in enumerate(preds):
        cp[i] = x[i] * self.mask_f[c]
      vote = torch.zeros((len(x), self.weight.shape[0], x.shape[1]), device=self.device)
      for i, c in enumerate(preds):
        vote[i] = cp[i] * self.masked_w[c]
      out = vote.sum(2) + self.bias
      return torch.logsumexp(out, dim=1)


class FastTorchLine:
  """The fastest LINe scorer we could write in PyTorch (CPU or GPU).

  Masks come as line_jax encodes them: class c keeps `weight[k, j]` iff
  `weight[k, j] > weight_floor[c, j]`, and feature j iff `neuron_mask[c, j]`.

  Modes:
    "gather": precomputed masked heads `[C, C, m]`, gathered per sample and
      applied with one batched matmul (small heads only).
    "grouped": batch sorted by predicted class, one matmul per class present,
      with precomputed heads if they fit in `head_budget_bytes`, else each
      class's head built once per batch.
  """

  def __init__(self, weight, bias, clip, weight_floor, neuron_mask, *, mode="grouped",
               head_budget_bytes=1 << 30, device="cpu"):
    self.weight = torch.as_tensor(np.asarray(weight, np.float32), device=device)
    self.bias = torch.as_tensor(np.asarray(bias, np.float32), device=device)
    self.clip = float(clip)
    self.floor = torch.as_tensor(np.asarray(weight_floor, np.float32), device=device)
    self.neuron_mask = torch.as_tensor(np.asarray(neuron_mask), device=device).float()
    self.mode = mode
    num_classes, m = self.weight.shape
    self.heads = None
    if num_classes * num_classes * m * 4 <= head_budget_bytes:
      self.heads = torch.stack([self._head(c) for c in range(num_classes)])
    elif mode == "gather":
      raise ValueError("gather mode needs the [C, C, m] heads, which exceed the budget")

  def _head(self, c: int) -> torch.Tensor:
    return torch.where(self.weight > self.floor[c], self.weight, 0.0)

  @torch.inference_mode()
  def __call__(self, features: torch.Tensor) -> torch.Tensor:
    x = features.clamp(max=self.clip)
    pred = torch.argmax(x @ self.weight.T + self.bias, dim=1)
    kept = x * self.neuron_mask[pred]
    if self.mode == "gather":
      out = torch.bmm(self.heads[pred], kept[:, :, None])[:, :, 0]
    else:
      head_of = (lambda c: self.heads[c]) if self.heads is not None else self._head
      out = grouped_masked_logits(kept, pred, self.weight.shape[0], head_of)
    return torch.logsumexp(out + self.bias, dim=1)


def grouped_masked_logits(kept: torch.Tensor, pred: torch.Tensor, num_classes: int,
                          head_of) -> torch.Tensor:
  """`[batch, classes]` logits, one masked head per predicted class present.

  Args:
    kept: `[batch, features]` clipped, neuron-masked features.
    pred: `[batch]` predicted classes.
    num_classes: the head's classes.
    head_of: class -> its masked `[classes, features]` head (PyTorch layout).
  """
  order = torch.argsort(pred)
  classes, counts = torch.unique_consecutive(pred[order], return_counts=True)
  out = torch.empty((kept.shape[0], num_classes), device=kept.device)
  start = 0
  for c, n in zip(classes.tolist(), counts.tolist()):
    idx = order[start:start + n]
    out[idx] = kept[idx] @ head_of(c).T
    start += n
  return out
