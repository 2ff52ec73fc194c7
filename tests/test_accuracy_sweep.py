"""benchmarks/accuracy_sweep.py --quick: real numbers, consistent with the runs, resumable."""

import importlib.util
import json
import pathlib
import sys

import pytest

from optg_jax import recipes

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy_sweep.py"


@pytest.fixture(scope="module")
def sweep_module():
  spec = importlib.util.spec_from_file_location("accuracy_sweep", _PATH)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def quick(sweep_module, tmp_path_factory):
  out = tmp_path_factory.mktemp("board")
  return out, sweep_module.main(["--quick", "--out", str(out)])


def test_quick_cells_are_real_runs(sweep_module, quick):
  out, result = quick
  q = sweep_module.QUICK
  record = json.loads((out / "accuracy_sweep.json").read_text())
  assert record == result["record"]
  cells = list(record["cells"].values())
  assert {(c["method"], c["target"], c["seed"]) for c in cells} == {
      (m, p, s) for m in q["methods"] for p in q["sparsities"] for s in q["seeds"]}
  for c in cells:
    # A test split of 200 digits: the accuracy is a count over 200, above chance after an epoch.
    assert 0.1 < c["accuracy"] <= 1.0 and (c["accuracy"] * q["test_examples"]) % 1 == 0
    assert c["sparsity"] == pytest.approx(c["target"], abs=1e-6)  # the final masks, exact counts
    assert c["epochs_used"] == q["epochs"]


def test_quick_cell_reruns_to_the_same_numbers(sweep_module, quick):
  _, result = quick
  cell = result["record"]["cells"]["optg|0.9|0"]
  again = sweep_module.run_cell("optg", 0.9, 0, 1, train_examples=500, test_examples=200)
  assert (again["accuracy"], again["sparsity"]) == (cell["accuracy"], cell["sparsity"])


def test_quick_table_and_plot(sweep_module, quick):
  out, result = quick
  table = (out / "accuracy_sweep.md").read_text()
  assert table == result["table"]
  for c in result["record"]["cells"].values():
    row = (f"| {c['method']} | {100 * c['target']:g}% | {100 * c['sparsity']:.2f}% | "
           f"{100 * c['accuracy']:.2f} ± 0.00 | 1 | 1 |")
    assert row in table
  pytest.importorskip("matplotlib")
  assert (out / "accuracy_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_interrupted_sweep_continues(sweep_module, quick, monkeypatch):
  out, result = quick
  done = result["record"]
  path = out / "resume.json"
  partial = dict(done, cells=dict(list(done["cells"].items())[:3]))
  path.write_text(json.dumps(partial))
  calls = []
  monkeypatch.setattr(sweep_module, "run_cell",
                      lambda *args, **kwargs: calls.append(args) or {"method": args[0],
                                                                        "target": args[1],
                                                                        "seed": args[2]})
  todo = sweep_module.cells(["optg", "magnitude"], [0.5, 0.9], [0])
  record = sweep_module.sweep(path, todo, 1)
  assert calls == [("magnitude", 0.9, 0, 1)]  # only the missing cell ran
  assert json.loads(path.read_text()) == record and len(record["cells"]) == 4
  with pytest.raises(ValueError, match="epochs"):
    sweep_module.sweep(path, todo, 5)


def test_every_registered_method_is_in_the_default_sweep(sweep_module):
  todo = sweep_module.cells(list(recipes.names()), [0.8, 0.99], [0, 1])
  assert {m for m, _, _ in todo} == set(recipes.names())
  assert [(p, s) for m, p, s in todo if m == "dense"] == [(None, 0), (None, 1)]
  assert sweep_module.epochs_used("optg", 7) == 7
  assert sweep_module.epochs_used("lottery_ticket", 7, 0.5) == 5 * 7  # 4 levels after dense
  assert sweep_module.epochs_used("continuous_sparsification", 7) == 4 * 7
