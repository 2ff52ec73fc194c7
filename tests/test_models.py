"""Model zoo: registry, output shapes, parameter counts from the architecture, init and BN modes.

Expected counts are recomputed here from each architecture's layer list (k·k·c_in·c_out per conv,
c_in·c_out per dense layer), independently of the model code, and checked against the papers'
published figures where those exist. Large nets are only traced (``jax.eval_shape``).
"""

import math

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optg_jax import models
from optg_jax.models import common

_ALL = ("lenet300100", "conv2", "conv4", "conv6", "conv8", "resnet20", "resnet32", "resnet56",
        "vgg16", "vgg19", "resnet50", "mobilenetv1")
# Only traced (jax.eval_shape): materialising 4-25M parameters costs seconds per net on a CPU.
_BIG = ("vgg16", "vgg19", "resnet50", "mobilenetv1")
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
_VGG19 = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
          512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def _key(seed=0):
  # Compiling threefry sampling for each new kernel shape dominates eager init on CPU; the
  # "rbg" generator compiles several times faster. Init statistics use the default generator.
  return jax.random.key(seed, impl="rbg")


def _abstract_variables(model, shape):
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


def _sizes(params, kernels_only=False):
  return sum(x.size for x in jax.tree.leaves(params) if not kernels_only or x.ndim >= 2)


def _conv(k, c_in, c_out):
  return k * k * c_in * c_out


# --------------------------------------------------------------------------- architecture formulae


def _convk_weights(widths, size=32, classes=10):
  convs, c_in = 0, 3
  for w in widths:
    convs += _conv(3, c_in, w) + _conv(3, w, w)
    c_in = w
  flat = (size // 2 ** len(widths)) ** 2 * c_in
  return convs + flat * 256 + 256 * 256 + 256 * classes


def _cifar_resnet(depth, widths=(16, 32, 64), classes=10, shortcut="A"):
  """(conv weights, dense weights, BN params) of a 6n+2 ResNet."""
  n = (depth - 2) // 6
  convs, bn, c_in = _conv(3, 3, widths[0]), 2 * widths[0], widths[0]
  for w in widths:
    convs += _conv(3, c_in, w) + _conv(3, w, w) + (n - 1) * 2 * _conv(3, w, w)
    bn += 2 * n * 2 * w
    if shortcut == "B" and c_in != w:
      convs, bn = convs + c_in * w, bn + 2 * w
    c_in = w
  return convs, widths[-1] * classes, bn


def _vgg_convs(config):
  weights, channels, c_in = 0, 0, 3
  for w in config:
    if w != "M":
      weights, channels, c_in = weights + _conv(3, c_in, w), channels + w, w
  return weights, channels


def _resnet50_weights(classes=1000):
  total, c_in = _conv(7, 3, 64), 64
  for blocks, w in zip((3, 4, 6, 3), (64, 128, 256, 512)):
    for j in range(blocks):
      total += c_in * w + _conv(3, w, w) + w * 4 * w + (c_in * 4 * w if j == 0 else 0)
      c_in = 4 * w
  return total + 2048 * classes


_MOBILENET_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)) + 5 * (
    (512, 1),) + ((1024, 2), (1024, 1))


def _mobilenet(classes=1000):
  """(conv+dense weights, BN params) of MobileNet-V1."""
  weights, bn, c_in = _conv(3, 3, 32), 2 * 32, 32
  for c_out, _ in _MOBILENET_BLOCKS:
    weights += _conv(3, 1, c_in) + c_in * c_out
    bn += 2 * c_in + 2 * c_out
    c_in = c_out
  return weights + 1024 * classes, bn


# --------------------------------------------------------------------------- registry


def test_registry_names_and_shapes():
  assert models.MODELS == _ALL
  assert models.input_shape("lenet300100") == (28, 28, 1)
  for name in ("conv2", "conv4", "conv6", "conv8", "resnet20", "resnet32", "resnet56", "vgg16",
               "vgg19"):
    assert models.input_shape(name) == (32, 32, 3)
  assert models.input_shape("resnet50") == models.input_shape("mobilenetv1") == (224, 224, 3)


def test_get_model_defaults_and_overrides():
  assert isinstance(models.get_model("resnet20"), models.ResNet20)
  assert isinstance(models.get_model("ResNet50"), models.ResNet50)
  assert models.get_model("resnet20").num_classes == 10
  assert models.get_model("mobilenetv1").num_classes == 1000
  m = models.get_model("resnet56", num_classes=100, shortcut="B")
  assert (m.num_classes, m.shortcut, m.depth) == (100, "B", 56)


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match="resnet18") as info:
    models.get_model("resnet18")
  assert all(name in str(info.value) for name in _ALL)
  with pytest.raises(ValueError, match="valid names"):
    models.input_shape("alexnet")


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", [n for n in _ALL if n not in _BIG])
def test_output_shape(name):
  model = models.get_model(name)
  x = jnp.ones((2, *models.input_shape(name)))
  variables = model.init(_key(), x)
  assert "classifier" in variables["params"]
  logits = model.apply(variables, x)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  if "batch_stats" in variables:
    logits, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
  else:
    logits = model.apply(variables, x, train=True)
  assert logits.shape == (2, 10)


@pytest.mark.parametrize("name", _BIG)
def test_output_shape_traced(name):
  model = models.get_model(name, num_classes=7)
  x = jnp.zeros((2, *models.input_shape(name)))
  variables = _abstract_variables(model, x.shape)
  assert jax.eval_shape(model.apply, variables, x).shape == (2, 7)
  out, _ = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x)
  assert out.shape == (2, 7)


def test_lenet_flattens_images():
  model = models.LeNet300100()
  x = jax.random.normal(_key(1), (3, 28, 28, 1))
  variables = model.init(_key(), x)
  np.testing.assert_allclose(model.apply(variables, x), model.apply(variables, x.reshape(3, 784)))


# --------------------------------------------------------------------------- parameter counts


def test_lenet_count():
  params = _abstract_variables(models.LeNet300100(), (1, 784))["params"]
  assert _sizes(params, kernels_only=True) == 784 * 300 + 300 * 100 + 100 * 10 == 266_200
  assert _sizes(params) == 266_200 + 300 + 100 + 10 == 266_610


@pytest.mark.parametrize("name,widths,published", [
    ("conv2", (64,), 4.30e6), ("conv4", (64, 128), 2.43e6),
    ("conv6", (64, 128, 256), 2.26e6), ("conv8", (64, 128, 256, 512), 5.28e6)])
def test_convk_counts(name, widths, published):
  params = _abstract_variables(models.get_model(name), (1, 32, 32, 3))["params"]
  expected = _convk_weights(widths)
  assert _sizes(params) == expected  # Bias-free by default.
  assert round(expected / 1e4) == round(published / 1e4)  # Signed-supermask README figures.
  with_bias = _abstract_variables(
      models.get_model(name, use_bias=True, activation="elu"), (1, 32, 32, 3))["params"]
  assert _sizes(with_bias) == expected + 2 * sum(widths) + 256 + 256 + 10


def test_resnet20_count():
  params = _abstract_variables(models.ResNet20(), (1, 32, 32, 3))["params"]
  convs, dense, bn = _cifar_resnet(20)
  # 3·3·3·16 + 6·(3·3·16·16) + (3·3·16·32 + 5·3·3·32·32) + (3·3·32·64 + 5·3·3·64·64).
  assert convs == 432 + 13_824 + 50_688 + 202_752 == 267_696
  assert dense == 64 * 10 == 640
  assert _sizes(params, kernels_only=True) == convs + dense == 268_336
  assert _sizes(params) == 268_336 + bn + 10 == 269_722  # "0.27M" (He et al. 2016).


@pytest.mark.parametrize("depth,published", [(20, 0.27e6), (32, 0.46e6), (56, 0.85e6)])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_resnet_counts(depth, published, shortcut):
  model = models.get_model(f"resnet{depth}", shortcut=shortcut)
  params = _abstract_variables(model, (1, 32, 32, 3))["params"]
  convs, dense, bn = _cifar_resnet(depth, shortcut=shortcut)
  assert _sizes(params, kernels_only=True) == convs + dense
  assert _sizes(params) == convs + dense + bn + 10
  if shortcut == "A":
    assert round(_sizes(params) / 1e4) == round(published / 1e4)


def test_cifar_resnet_generic():
  # OptG's "ResNet50_cifar10": 6·8+2 basic blocks, widths 32/64/128, bias-free classifier.
  model = models.CifarResNet(50, widths=(32, 64, 128), classifier_bias=False)
  params = _abstract_variables(model, (1, 32, 32, 3))["params"]
  convs, dense, bn = _cifar_resnet(50, widths=(32, 64, 128))
  assert _sizes(params) == convs + dense + bn
  for bad in (models.CifarResNet(21), models.ResNet20(shortcut="C"),
              models.CifarResNet(20, widths=(16, 32))):
    with pytest.raises(ValueError):
      _abstract_variables(bad, (1, 32, 32, 3))


@pytest.mark.parametrize("name,config", [("vgg16", _VGG16), ("vgg19", _VGG19)])
def test_vgg_counts(name, config):
  conv_weights, channels = _vgg_convs(config)
  params = _abstract_variables(models.get_model(name), (1, 32, 32, 3))["params"]
  kernels = {k: v["kernel"].size for k, v in params.items() if k.startswith("conv")}
  assert sum(kernels.values()) == conv_weights
  assert len(kernels) == (13 if name == "vgg16" else 16)
  assert params["classifier"]["kernel"].shape == (512, 10)
  assert _sizes(params) == conv_weights + 2 * channels + 512 * 10 + 10
  if name == "vgg19":
    assert conv_weights == 20_018_880 and channels == 5_504
    with_bias = _abstract_variables(models.VGG19(use_bias=True), (1, 32, 32, 3))["params"]
    conv_params = sum(_sizes(v) for k, v in with_bias.items() if k.startswith("conv"))
    assert conv_params == 20_018_880 + 5_504 == 20_024_384
  else:
    assert conv_weights == 14_710_464


def test_resnet50_count():
  variables = _abstract_variables(models.ResNet50(), (1, 224, 224, 3))
  params = variables["params"]
  assert _sizes(params, kernels_only=True) == _resnet50_weights() == 25_502_912
  assert "bias" not in params["classifier"]
  assert params["stage2_block1"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
  # torchvision's 25,557,032 less the 1,000 fc biases.
  assert _sizes(params) == 25_556_032
  assert _sizes(variables["batch_stats"]) == 53_120


def test_mobilenet_count():
  params = _abstract_variables(models.MobileNetV1(), (1, 224, 224, 3))["params"]
  weights, bn = _mobilenet()
  assert _sizes(params, kernels_only=True) == weights == 4_209_088
  assert _sizes(params) == weights + bn == 4_230_976
  assert params["block13"]["dw_conv"]["kernel"].shape == (3, 3, 1, 1024)
  assert "bias" not in params["classifier"]


# --------------------------------------------------------------------------- initialisation


def _moments(w, fan_in):
  w = np.asarray(w, np.float64).ravel()
  sigma = math.sqrt(2.0 / fan_in)
  kurtosis = np.mean((w - w.mean()) ** 4) / np.var(w) ** 2
  return w.std() / sigma, np.abs(w).max() / sigma, kurtosis


def test_kaiming_normal_is_untruncated():
  params = models.LeNet300100().init(jax.random.key(0), jnp.zeros((1, 784)))["params"]
  ratio, peak, kurtosis = _moments(params["fc1"]["kernel"], fan_in=784)
  assert abs(ratio - 1) < 0.02
  # A normal truncated at 2σ (nn.initializers.he_normal) never exceeds ≈2.3σ of the target
  # and has kurtosis ≈2.4; 235,200 untruncated draws reach ≈4.5σ with kurtosis 3.
  assert peak > 3.5 and abs(kurtosis - 3) < 0.1
  truncated = nn.initializers.he_normal()(jax.random.key(0), (784, 300))
  _, t_peak, t_kurtosis = _moments(truncated, fan_in=784)
  assert t_peak < 2.3 and t_kurtosis < 2.6


def test_conv_fans_and_zero_biases():
  variables = models.ResNet20().init(_key(), jnp.zeros((1, 32, 32, 3)))
  ratio, _, _ = _moments(variables["params"]["stage3_block2"]["conv1"]["kernel"], 3 * 3 * 64)
  assert abs(ratio - 1) < 0.03
  block = models.mobilenet.DepthwiseSeparable(1024)
  dw = block.init(_key(1), jnp.zeros((1, 4, 4, 1024)))["params"]["dw_conv"]["kernel"]
  ratio, _, _ = _moments(dw, 3 * 3)  # Fan-in of a depthwise 3×3 kernel (3, 3, 1, C).
  assert abs(ratio - 1) < 0.05
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
    name = jax.tree_util.keystr(path)
    if "bias" in name or "mean" in name:
      np.testing.assert_array_equal(leaf, 0, err_msg=name)
    elif "scale" in name or "var" in name:
      np.testing.assert_array_equal(leaf, 1, err_msg=name)


def test_kernel_init_option():
  model = models.get_model("lenet300100", kernel_init=models.xavier_normal)
  params = model.init(_key(), jnp.zeros((1, 784)))["params"]
  std = float(np.std(params["fc1"]["kernel"]))
  assert abs(std / math.sqrt(2.0 / (784 + 300)) - 1) < 0.02


# --------------------------------------------------------------------------- batch norm


def test_batch_norm_train_and_eval():
  x = 3.0 + 2.0 * jax.random.normal(_key(), (64, 4, 4, 8))
  bn = common.batch_norm(train=True)
  variables = bn.init(_key(1), x)
  y, updates = bn.apply(variables, x, mutable=["batch_stats"])
  np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-4)
  stats = updates["batch_stats"]
  np.testing.assert_allclose(stats["mean"], 0.1 * x.mean(axis=(0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * x.var(axis=(0, 1, 2)), rtol=1e-5)
  y = common.batch_norm(train=False).apply(variables, x)
  np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_model_bn_modes():
  model = models.ResNet20()
  x = jax.random.normal(_key(), (4, 32, 32, 3))
  variables = model.init(_key(1), x)
  with pytest.raises(flax.errors.ModifyScopeVariableError, match="batch_stats"):
    model.apply(variables, x, train=True)  # Train mode must update the running statistics.
  out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  new_mean = updates["batch_stats"]["stem_bn"]["mean"]
  assert not np.allclose(new_mean, variables["batch_stats"]["stem_bn"]["mean"])
  # Train mode normalises with batch statistics, so an example's logits depend on the batch.
  alone, _ = model.apply(variables, x[:1], train=True, mutable=["batch_stats"])
  assert not np.allclose(alone, out[:1], atol=1e-4)
  # Eval mode uses running averages: per-example and unchanged by the batch.
  eval_out = model.apply(variables, x)
  np.testing.assert_allclose(model.apply(variables, x[:1]), eval_out[:1], rtol=1e-4, atol=1e-5)
