"""Tests for optg_jax.schedules: values against independent formulas, jit/vmap, bad input."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from optg_jax import schedules


def _logistic(z):
  return 1.0 / (1.0 + math.exp(-z))


def _zhu_gupta(t, p_final, t0, t1, freq, p0, power):
  """Reference Zhu & Gupta staircase in plain Python (float64)."""
  if t < t0:
    return p0
  if t >= t1:
    return p_final
  ts = t0 + ((t - t0) // freq) * freq
  return p_final + (p0 - p_final) * (1.0 - (ts - t0) / (t1 - t0)) ** power


def _values(fn, steps):
  return np.array([float(fn(s)) for s in steps], dtype=np.float64)


class SparsityScheduleTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_constant(self):
    fn = self.variant(schedules.constant(0.7))
    for step in (0, 1, 10**6):
      out = fn(step)
      chex.assert_type(out, jnp.float32)
      chex.assert_shape(out, ())
      np.testing.assert_allclose(out, 0.7, rtol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_one_shot(self):
    fn = self.variant(schedules.one_shot(0.8, step=5, initial_sparsity=0.1))
    got = _values(fn, range(10))
    want = [0.1 if t < 5 else 0.8 for t in range(10)]
    np.testing.assert_allclose(got, want, rtol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
      dict(t0=0, t1=100, freq=1, p0=0.0, power=3),
      dict(t0=10, t1=50, freq=7, p0=0.2, power=3),  # t1 - t0 not a multiple of freq
      dict(t0=100, t1=1100, freq=100, p0=0.0, power=2.5),
  )
  def test_polynomial_matches_formula(self, t0, t1, freq, p0, power):
    fn = self.variant(
        schedules.polynomial(0.9, t0, t1, frequency=freq, initial_sparsity=p0, power=power)
    )
    steps = range(0, t1 + 3 * freq + 2)
    want = [_zhu_gupta(t, 0.9, t0, t1, freq, p0, power) for t in steps]
    np.testing.assert_allclose(_values(fn, steps), want, rtol=1e-6, atol=1e-7)

  def test_polynomial_staircase_is_constant_between_refreshes(self):
    fn = schedules.polynomial(0.9, begin_step=10, end_step=110, frequency=20)
    values = _values(fn, range(200))
    for t in range(200):
      if t < 10 or t >= 110:
        continue
      anchor = 10 + (t - 10) // 20 * 20
      assert values[t] == values[anchor], t
    # Distinct values: p0 (also the value of the stair at t0), one per later stair, and P.
    assert len(set(values.tolist())) == 1 + 4 + 1
    assert values[9] == 0.0 and values[10] == 0.0  # the ramp starts at p0
    np.testing.assert_allclose(values[30], 0.9 - 0.9 * (1 - 20 / 100) ** 3, rtol=1e-6)
    np.testing.assert_allclose(values[110:], 0.9, rtol=1e-7)

  def test_polynomial_monotone(self):
    fn = schedules.polynomial(0.95, 3, 500, frequency=9, initial_sparsity=0.1)
    values = _values(fn, range(600))
    assert np.all(np.diff(values) >= 0)
    assert values[0] == pytest.approx(0.1) and values[-1] == pytest.approx(0.95)

  @chex.variants(with_jit=True, without_jit=True)
  def test_sigmoid_fraction_reference_values(self):
    # OptG ResNet-50: E = 100, the values quoted in the reference notes.
    spe = 7
    fn = self.variant(schedules.sigmoid_fraction(spe, 100))
    for epoch, approx in ((40, 4.54e-5), (45, 6.7e-3), (48, 0.119), (50, 0.5), (52, 0.881)):
      for step in (epoch * spe, epoch * spe + spe - 1):  # constant within the epoch
        want = _logistic(epoch - 50)
        np.testing.assert_allclose(fn(step), want, rtol=1e-5)
        np.testing.assert_allclose(fn(step), approx, rtol=1e-2)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(
      dict(spe=1, epochs=100, beta=1.0),
      dict(spe=13, epochs=9, beta=0.5),  # odd E: centre between two epochs
      dict(spe=4, epochs=160, beta=2.0),
  )
  def test_sigmoid_matches_formula(self, spe, epochs, beta):
    fn = self.variant(schedules.sigmoid(0.9, spe, epochs, beta=beta))
    frac = self.variant(schedules.sigmoid_fraction(spe, epochs, beta=beta))
    steps = range(0, spe * epochs, max(1, spe // 3))
    want = [0.9 * _logistic(beta * (t // spe - epochs / 2)) for t in steps]
    np.testing.assert_allclose(_values(fn, steps), want, rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(_values(fn, steps), 0.9 * _values(frac, steps), rtol=1e-6)

  def test_sigmoid_staircase_and_monotone(self):
    spe = 5
    values = _values(schedules.sigmoid(0.98, spe, 20), range(spe * 20))
    assert np.all(np.diff(values) >= 0)
    for epoch in range(20):
      chunk = values[epoch * spe:(epoch + 1) * spe]
      assert np.all(chunk == chunk[0])
    assert values[10 * spe] == pytest.approx(0.49)

  @parameterized.parameters(
      (lambda: schedules.constant(0.3),),
      (lambda: schedules.one_shot(0.9, 17, 0.2),),
      (lambda: schedules.polynomial(0.9, 5, 90, frequency=4, initial_sparsity=0.1),),
      (lambda: schedules.sigmoid(0.9, 3, 30),),
      (lambda: schedules.sigmoid_fraction(3, 30, beta=0.7),),
  )
  def test_jit_vmap_agree_with_eager(self, make):
    fn = make()
    steps = jnp.arange(120, dtype=jnp.int32)
    eager = _values(fn, range(120))
    np.testing.assert_array_equal(jax.vmap(fn)(steps), eager.astype(np.float32))
    # XLA may fuse or use a reciprocal under jit: equal up to float32 rounding.
    np.testing.assert_allclose(jax.jit(jax.vmap(fn))(steps), eager, rtol=3e-7)
    out = jax.jit(fn)(jnp.int32(41))
    chex.assert_type(out, jnp.float32)
    chex.assert_shape(out, ())
    np.testing.assert_allclose(out, eager[41], rtol=3e-7)


class PredicateTest(chex.TestCase):

  def _check(self, pred, want: set, steps=range(0, 200)):
    got = {t for t in steps if bool(pred(t))}
    assert got == want
    traced = jax.jit(jax.vmap(pred))(jnp.arange(steps.start, steps.stop, dtype=jnp.int32))
    chex.assert_type(traced, jnp.bool_)
    assert {t for t, hit in zip(steps, np.asarray(traced)) if hit} == want

  def test_every_n_steps(self):
    self._check(schedules.every_n_steps(7), set(range(0, 200, 7)))
    self._check(schedules.every_n_steps(7, begin_step=5), set(range(5, 200, 7)))
    self._check(schedules.every_n_steps(7, 5, end_step=40), {5, 12, 19, 26, 33})
    self._check(schedules.every_n_steps(7, 5, end_step=47), {5, 12, 19, 26, 33, 40})
    self._check(schedules.every_n_steps(1, 3, end_step=3), set())

  def test_epoch_boundaries(self):
    self._check(schedules.epoch_boundaries(9), set(range(0, 200, 9)))
    self._check(schedules.epoch_boundaries(9, begin_epoch=2, end_epoch=5), {18, 27, 36})
    self._check(schedules.epoch_boundaries(1, begin_epoch=150), set(range(150, 200)))

  def test_in_window(self):
    self._check(schedules.in_window(10, 20), set(range(10, 20)))
    self._check(schedules.in_window(10, 50, every=15), {10, 25, 40})
    self._check(schedules.in_window(0, 0), set())

  def test_combinators(self):
    a = schedules.every_n_steps(4)
    b = schedules.in_window(10, 30)
    self._check(schedules.any_of(a, b), set(range(0, 200, 4)) | set(range(10, 30)))
    self._check(schedules.all_of(a, b), set(range(0, 200, 4)) & set(range(10, 30)))
    self._check(schedules.any_of(b), set(range(10, 30)))

  @chex.variants(with_jit=True, without_jit=True)
  def test_scalar_bool_output(self):
    out = self.variant(schedules.epoch_boundaries(10))(jnp.int32(20))
    chex.assert_type(out, jnp.bool_)
    chex.assert_shape(out, ())
    assert bool(out)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: schedules.constant(1.0), "sparsity"),
        (lambda: schedules.constant(-0.1), "sparsity"),
        (lambda: schedules.constant(float("nan")), "sparsity"),
        (lambda: schedules.one_shot(1.2, 3), "sparsity"),
        (lambda: schedules.one_shot(0.5, -1), "step"),
        (lambda: schedules.one_shot(0.5, 3, initial_sparsity=1.0), "initial_sparsity"),
        (lambda: schedules.polynomial(1.0, 0, 10), "final_sparsity"),
        (lambda: schedules.polynomial(0.9, 0, 10, initial_sparsity=-0.5), "initial_sparsity"),
        (lambda: schedules.polynomial(0.9, -1, 10), "begin_step"),
        (lambda: schedules.polynomial(0.9, 10, 5), "end_step"),
        (lambda: schedules.polynomial(0.9, 10, 10), "end_step"),
        (lambda: schedules.polynomial(0.9, 0, 10, frequency=0), "frequency"),
        (lambda: schedules.polynomial(0.9, 0, 10, power=0), "power"),
        (lambda: schedules.polynomial(0.9, 0, 10, power=float("inf")), "power"),
        (lambda: schedules.sigmoid(1.0, 10, 100), "final_sparsity"),
        (lambda: schedules.sigmoid(0.9, 0, 100), "steps_per_epoch"),
        (lambda: schedules.sigmoid(0.9, 10, 0), "total_epochs"),
        (lambda: schedules.sigmoid(0.9, 10, 100, beta=float("nan")), "beta"),
        (lambda: schedules.sigmoid_fraction(10, 100, beta=float("inf")), "beta"),
        (lambda: schedules.sigmoid_fraction(-3, 100), "steps_per_epoch"),
        (lambda: schedules.every_n_steps(0), "n"),
        (lambda: schedules.every_n_steps(5, begin_step=-2), "begin_step"),
        (lambda: schedules.every_n_steps(5, begin_step=10, end_step=9), "end_step"),
        (lambda: schedules.epoch_boundaries(0), "steps_per_epoch"),
        (lambda: schedules.epoch_boundaries(10, begin_epoch=-1), "begin_epoch"),
        (lambda: schedules.epoch_boundaries(10, begin_epoch=3, end_epoch=2), "end_epoch"),
        (lambda: schedules.in_window(-1, 10), "begin_step"),
        (lambda: schedules.in_window(10, 9), "end_step"),
        (lambda: schedules.in_window(0, 10, every=0), "every"),
        (lambda: schedules.any_of(), "predicates"),
        (lambda: schedules.all_of(), "predicates"),
    ],
)
def test_bad_input_names_the_argument(make, match):
  with pytest.raises(ValueError, match=rf"^{match}\b"):
    make()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: schedules.one_shot(0.5, 2.5), "step"),
        (lambda: schedules.every_n_steps(2.0), "n"),
    ],
)
def test_non_integer_steps_are_type_errors(make, match):
  with pytest.raises(TypeError, match=rf"^{match}\b"):
    make()
