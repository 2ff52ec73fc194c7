"""The ``--quick`` modes of the step benchmarks run and write their JSON (no timing assertions)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("flax")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_quick(script: str, out: pathlib.Path) -> tuple[dict, str]:
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out",
                         str(out)], capture_output=True, text=True, timeout=600, check=False,
                        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(out.read_text()), proc.stdout


def test_step_overhead_quick_gives_a_positive_ratio_per_method_and_kind_of_step(tmp_path):
  result, stdout = run_quick("step_overhead.py", tmp_path / "steps.json")
  kinds = {(r["method"], r["kind"]): r for r in result["rows"]}
  # OptG and GMP refresh at epoch boundaries; one-shot magnitude only at init.
  assert set(kinds) == {("optg", "steady"), ("optg", "refresh"), ("gmp", "steady"),
                        ("gmp", "refresh"), ("magnitude", "steady")}
  assert kinds[("optg", "refresh")]["count"] + 1 == kinds[("optg", "steady")]["count"]
  for row in result["rows"]:
    for key in ("ratio", "ratio_of_fastest", "method_ms", "dense_ms", "compile_s",
                "dense_compile_s"):
      assert math.isfinite(row[key]) and row[key] > 0, (row["method"], row["kind"], key)
  # --quick makes one trial: the ratio is that trial's.
  assert all(r["trial_ratios"] == [r["ratio"]] for r in result["rows"])
  # Refresh steps that run a top-k are set beside a dense step plus that top-k timed alone.
  for method in ("optg", "gmp"):
    row = kinds[(method, "refresh")]
    assert row["selection_ms"] > 0
    assert row["vs_dense_plus_selection"] == pytest.approx(
        row["method_ms"] / (row["dense_ms"] + row["selection_ms"]))
  assert "selection_ms" not in kinds[("optg", "steady")]
  assert "| lenet300100 (128) | optg |" in stdout


def test_memory_quick_gives_bytes_per_weight_per_method(tmp_path):
  result, stdout = run_quick("memory.py", tmp_path / "memory.json")
  rows = {r["method"]: r for r in result["rows"]}
  assert {"sgd_momentum", "adam", "optg", "magnitude"} <= set(rows)
  # Exact counts: float32 momentum is 4 bytes per weight, Adam's two moments 8.
  assert rows["sgd_momentum"]["optimizer_bytes_per_weight"] == pytest.approx(4.0, rel=1e-2)
  assert rows["adam"]["optimizer_bytes_per_weight"] == pytest.approx(8.0, rel=1e-2)
  # Bool masks: one byte per prunable weight (scalar True elsewhere).
  assert rows["magnitude"]["masks_bytes_per_weight"] == pytest.approx(1.0, rel=1e-2)
  # OptG: masks (1) + float32 scores (4) + their momentum (4), plus a few scalars.
  assert rows["optg"]["method_bytes_per_weight"] == pytest.approx(9.0, rel=1e-2)
  assert "| optg |" in stdout
