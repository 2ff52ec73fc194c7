"""The settings of a run of the main job, with the defaults every model config starts from.

A config module defines ``get_config()`` returning a :class:`Config`; the per-model configs of
this directory start from :func:`get_config` and set the model's reference hyperparameters (the
OptG paper's configs). Flags of ``examples/main.py`` override any field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# The method presets: each method's own options, passed to its recipe
# (``optg_jax.recipes.make_optimizer(method, sparsity, ..., **options)``). A new method is one
# more entry here (and one ``recipes.register_recipe``), not a branch in the job; a config may
# give a method other options, e.g. ``{"optg": {"distribution": "erk"}}``.
METHODS: Mapping[str, Mapping[str, Any]] = {
    "dense": {},
    # 'auto': the authors' ramp from 100 epochs on, below that the budget ramp, which reaches
    # the target at min(0.6·E, E − 1) (og.mask_optimizer's `ramp`; the job prints which).
    "optg": {"ramp": "auto"},
    "gmp": {},
    "magnitude": {},
    "snip": {},
    "random": {},
    # Koster et al.'s FCN / Conv2-8 config (SGDW on the masks, decoupled decay, q = 0.4) over
    # ELUS weights ±√(weight_factor·2/fan_in).
    "signed_supermask": {"score_lr": 0.05, "score_decay": 5e-4, "threshold": 0.4,
                         "weight_factor": 1.5},
    # Ramanujan et al.'s Conv2-8 config: scores on SGD 0.9, wd 1e-4, per-epoch cosine from 0.1,
    # over signed Kaiming constant weights.
    "edge_popup": {"score_lr": 0.1, "score_decay": 1e-4, "weights": "signed_constant"},
    # The methods with rounds or phases: ``epochs`` is one round (one level of IMP, one search
    # round of CS, RST's finetuning), the job runs ``recipes.total_epochs`` in all.
    # IMP: the fewest levels of 20 % reaching ``sparsity``, rewound to the init (the original
    # LTH; deep nets rewind to an early epoch, e.g. ``rewind_epoch=2``).
    "lottery_ticket": {"rewind_epoch": 0, "rate": 0.2},
    # Savarese et al.: 3 search rounds and the ticket, λ = 1e-8, β_T = 200, s0 = 0, rewind to
    # epoch 2; every kernel of the MLP (the reference masks 3×3 convs: ``layers='reference'``).
    "continuous_sparsification": {"num_rounds": 3, "penalty": 1e-8, "final_temperature": 200.0,
                                  "s0": 0.0, "rewind_epoch": 2, "layers": "all"},
    # Bai et al.: a random subnetwork per layer (the classifier dense, as their pattern keeps
    # it), ceil(E/2) epochs of extrusion at lr 1e-3 with the reference's dose Σ lr·λ = 65.
    "rst": {"pick": "random", "extrusion_lr": 1e-3, "extrusion_dose": "reference",
            "exclude": ("^classifier/",)},
}

# Model options per method: the papers' variants of a model (``models.get_model(**options)``).
MODEL_OPTIONS: Mapping[str, Mapping[str, Any]] = {
    "signed_supermask": {"activation": "elu", "use_bias": False},  # the FCN / Conv2-8 of the paper
    "edge_popup": {"use_bias": False},
}


@dataclasses.dataclass(frozen=True)
class Config:
  """What defines a run (stored in ``WORKDIR/config.json``; a resumed run must match it).

  The weights train with SGD (``momentum``) on the per-epoch warm-up + cosine learning rate of
  ``optg_jax.recipes.warmup_cosine_per_epoch`` (peak ``lr``, ``warmup_epochs``, capped at
  ``epochs // 2`` so that short runs finish their warm-up by mid-run), with ``weight_decay`` on
  every weight and ``label_smoothing`` in the loss.
  """
  model: str = "lenet300100"
  dataset: str = "mnist5k"
  method: str = "optg"
  sparsity: float = 0.9
  epochs: int = 40
  batch_size: int = 100
  lr: float = 0.1
  weight_decay: float = 5e-4
  label_smoothing: float = 0.0
  momentum: float = 0.9
  warmup_epochs: int = 5
  seed: int = 0
  train_examples: int | None = None  # train on the first N examples only
  test_examples: int | None = None  # evaluate on the first N examples only
  dense_baseline: bool | None = None  # also train the dense model; None: on for mnist5k
  skip_nonfinite: bool = False  # skip steps with a non-finite loss (optax.apply_if_finite)
  methods: Mapping[str, Mapping[str, Any]] = dataclasses.field(
      default_factory=lambda: {name: dict(options) for name, options in METHODS.items()})
  model_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(
      default_factory=lambda: {name: dict(options) for name, options in MODEL_OPTIONS.items()})

  def replace(self, **changes: Any) -> Config:
    return dataclasses.replace(self, **changes)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, values: Mapping[str, Any]) -> Config:
    """The config stored by :meth:`to_json` (unknown keys refused, missing ones default)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"unknown config fields {unknown}")
    return cls(**values)

  @property
  def method_options(self) -> Mapping[str, Any]:
    """The options of ``method`` (its preset in ``methods``)."""
    if self.method not in self.methods:
      raise ValueError(f"unknown method {self.method!r}; valid: {', '.join(self.methods)}")
    return self.methods[self.method]


def get_config() -> Config:
  """The defaults: OptG at 90 % on LeNet-300-100 and the embedded MNIST digits."""
  return Config()
