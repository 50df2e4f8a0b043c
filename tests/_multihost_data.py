"""The data tests/test_multihost.py splits over two processes."""

import numpy as np

N, M, C = 301, 12, 4
SMALL = {"knn": {"k": 7}, "vim": {"dim": 5}, "nnguide": {"k": 7}}
# Uneven shards: process 0 holds rows [0, 190), process 1 [190, 301), each in
# batches of uneven sizes, none a multiple of the device count.
EDGES = {0: (0, 1, 64, 65, 190), 1: (190, 257, 301)}


def problem(seed=0):
  rng = np.random.default_rng(seed)
  features = np.abs(rng.normal(size=(N, M))).astype(np.float32)
  labels = rng.permutation(np.arange(N) % C).astype(np.int32)
  features += np.eye(C, M, dtype=np.float32)[labels]
  kernel = rng.normal(size=(M, C)).astype(np.float32)
  bias = rng.normal(size=(C,)).astype(np.float32)
  test = np.abs(rng.normal(size=(19, M))).astype(np.float32)
  return features, labels, kernel, bias, test


def local_batches(features, labels, pid):
  edges = EDGES[pid]
  return [(features[a:b], labels[a:b]) for a, b in zip(edges[:-1], edges[1:])]
