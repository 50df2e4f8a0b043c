"""The benchmark suites: pinned constants and selection rules."""

import numpy as np
import pytest

from line_jax import suites
from line_jax import scorers
from line_jax.data import MEAN_STD


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_suites_normalise_with_the_official_line_dice_constants(name):
  # LINe's and DICE's ood_eval.py / precompute.py: transforms.Normalize(
  #   (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)).
  suite = suites.get(name)
  mean, std = MEAN_STD[suite.mean_std]
  assert mean == (0.4914, 0.4822, 0.4465)
  assert std == (0.2023, 0.1994, 0.2010)
  assert suite.model == "densenet100"
  assert (suite.image_size, suite.resize_size, suite.channels) == (32, 32, 3)


def test_cifar_line_settings_are_the_papers():
  assert suites.get("cifar10").hparams["line"] == {"p_w": 90.0, "p_a": 90.0, "clip": 1.0}
  assert suites.get("cifar100").hparams["line"] == {"p_w": 90.0, "p_a": 10.0, "clip": 1.0}


def test_every_suite_hparam_names_a_registered_scorer_and_a_valid_key():
  for suite in suites.SUITES.values():
    for method, hp in suite.hparams.items():
      assert set(hp) <= set(scorers.get(method).defaults), (suite.name, method)


def test_svhn_is_the_official_selection():
  svhn = [s for s in suites.get("cifar10").ood if s.name == "svhn"]
  assert len(svhn) == 1
  assert (svhn[0].kind, svhn[0].split, svhn[0].per_label) == ("svhn_mat", "test", 1000)
  assert svhn[0].path("/d") == "/d/svhn/test_32x32.mat"


def test_first_per_label_keeps_the_first_of_each_label_in_file_order():
  labels = np.array([3, 1, 3, 3, 1, 2, 3, 2, 1, 1])
  assert suites.first_per_label(labels, 2).tolist() == [0, 1, 2, 4, 5, 7]
  assert suites.first_per_label(labels, 10).tolist() == list(range(10))
  # Against the official loop (select_svhn_data.py) on a larger draw.
  rng = np.random.default_rng(0)
  labels = rng.integers(1, 11, 5000)  # SVHN's .mat labels are 1..10.
  count, expected = {}, []
  for i, y in enumerate(labels):
    if count.get(y, 0) < 300:
      expected.append(i)
      count[y] = count.get(y, 0) + 1
  assert suites.first_per_label(labels, 300).tolist() == expected


def test_cifar_offline_sets_add_fashion_mnist_and_keep_the_embedded_ones():
  from line_jax.data import _embedded_ood

  offline = suites.get("cifar10").offline_ood
  assert "fashion_mnist" in offline
  assert set(_embedded_ood.OOD_SET_NAMES) < set(offline)
  assert suites.get("fashion_mnist").offline_ood == _embedded_ood.OOD_SET_NAMES
  assert suites.get("imagenet").offline_ood == ()


def test_missing_inputs_with_an_id_folder(tmp_path):
  suite = suites.get("cifar10")
  ckpt = tmp_path / "w.pth"
  ckpt.write_bytes(b"")
  (tmp_path / "id" / "train").mkdir(parents=True)
  missing = suites.missing_inputs(suite, None, str(ckpt), str(tmp_path / "id"))
  assert len(missing) == 1 and "no test/ folder" in missing[0]
  (tmp_path / "id" / "test").mkdir()
  # OOD sets are not required: the offline ones stand in.
  assert suites.missing_inputs(suite, None, str(ckpt), str(tmp_path / "id")) == []
  present, absent = suites.paper_ood(suite, str(tmp_path))
  assert present == () and len(absent) == len(suite.ood)
  (tmp_path / "LSUN").mkdir()
  present, _ = suites.paper_ood(suite, str(tmp_path))
  assert [s.name for s in present] == ["lsun_c"]


def test_imagenet_still_requires_its_ood_sets(tmp_path):
  missing = suites.missing_inputs(suites.get("imagenet"), str(tmp_path), None)
  assert any("inaturalist" in line for line in missing)


def test_inputs_name_the_settings_they_take():
  # A user's own inputs: the registry defaults unless they name a benchmark.
  assert suites.Inputs(None, [], [], {}).settings == suites.NO_BENCHMARK
  named = suites.Inputs(None, [], [], {}, settings="cifar10", hparams={"knn": {"k": 5}})
  assert named.settings == "cifar10" and named.hparams == {"knn": {"k": 5}}
  with pytest.raises(ValueError, match="unknown benchmark"):
    suites.Inputs(None, [], [], {}, settings="cifar")
  with pytest.raises(ValueError, match="unknown hyperparameter"):
    suites.Inputs(None, [], [], {}, hparams={"react": {"p": 1}})


def test_a_benchmark_s_own_inputs_take_its_settings():
  import os
  from line_jax import data
  if not os.path.isdir(data.DEBIAN_FASHION_MNIST_DIR):
    pytest.skip("Debian's dataset-fashion-mnist is not installed")
  for name in ("fashion_mnist", "fashion_mnist_cifar_settings"):
    inputs = suites.fashion_mnist_inputs(max_train=20, max_test=10, ood_size=4, settings=name)
    assert inputs.settings == name and len(inputs.train) == 20
