"""benchmarks/mask_refresh.py --quick: every row is there, the bisection-only and 8-device
sharded selections give the one-device masks, and the sharded program moves no scores between
devices (no timing assertions)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("flax")

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_mode_rows_and_sharded_masks(tmp_path):
  out = tmp_path / "mask_refresh.json"
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "mask_refresh.py"), "--quick",
                         "--repeats", "1", "--out", str(out)], capture_output=True, text=True,
                        timeout=900, check=False, cwd=ROOT,
                        env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert [row["n"] for row in result["sizes"]] == [200_000]
  ways = {row["way"]: row for row in result["ways"]}
  assert list(ways) == ["one elementwise pass", "global (planner)", "global (bisection only)",
                        "layerwise", "global, 8 devices sharded"]
  for row in ways.values():
    assert math.isfinite(row["ms"]) and row["ms"] > 0 and row["passes"] > 0, row
  assert ways["global (bisection only)"]["same_masks"] is True
  assert ways["global, 8 devices sharded"]["same_masks"] is True
  sharded = result["sharded"]
  assert sharded["sharded_leaves"] == 3
  # Counts are all-reduced; only the sample's pieces are gathered, no leaf is resharded.
  assert sharded["moves_scores"] == [], sharded["moves_scores"]
  assert sharded["moved_elements"] <= 2 * sharded["sample"], sharded  # grids, before thinning
  assert "| global, 8 devices sharded |" in proc.stdout
