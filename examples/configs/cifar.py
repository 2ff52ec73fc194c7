"""The CIFAR models (Conv-2/4/6/8, ResNet-20/32/56, VGG-16/19) on CIFAR-10.

OptG's CIFAR config: 160 epochs, batch 256, peak lr 0.1, weight decay 5e-4, no label smoothing.
``--dataset cifar100`` trains the same budget on CIFAR-100. The supermask methods take their
papers' per-model settings: the signed supermask's ResNet-20 (q = 0.75, SGDW lr 0.3, decay 3e-4)
and ResNet-56 (q = 0.8, lr 0.15, decay 1e-4, ELUS factor 1.3) configs, run on a constant learning
rate (the paper's reduce-on-plateau is not implemented); edge-popup's ResNet weight decay 5e-4.
"""

from configs import default

MODELS = ("conv2", "conv4", "conv6", "conv8", "resnet20", "resnet32", "resnet56", "vgg16", "vgg19")

_SIGNED_RESNET = {
    "resnet20": {"score_lr": 0.3, "score_decay": 3e-4, "threshold": 0.75, "weight_factor": 1.5},
    "resnet32": {"score_lr": 0.3, "score_decay": 3e-4, "threshold": 0.75, "weight_factor": 1.5},
    "resnet56": {"score_lr": 0.15, "score_decay": 1e-4, "threshold": 0.8, "weight_factor": 1.3},
}


def _round_methods(methods, model):
  """CS masks the 3×3 convs (the code); RST keeps the stem conv and the classifier dense."""
  stem = "^stem_conv/" if model.startswith("resnet") else "^conv1/"
  return {**methods,
          "continuous_sparsification": {**methods["continuous_sparsification"],
                                        "layers": "reference"},
          "rst": {**methods["rst"], "exclude": (stem, "^classifier/")}}


def get_config(model: str = "resnet20") -> default.Config:
  cfg = default.get_config().replace(
      model=model, dataset="cifar10", epochs=160, batch_size=256, lr=0.1, weight_decay=5e-4,
      label_smoothing=0.0)
  cfg = cfg.replace(methods=_round_methods(cfg.methods, model))
  if model.startswith("conv"):
    return cfg
  methods = dict(cfg.methods)
  model_options = {"signed_supermask": {}, "edge_popup": {}}  # no ELU / bias switches here
  if model in _SIGNED_RESNET:
    methods["signed_supermask"] = {**_SIGNED_RESNET[model], "exponential_decay": False}
    methods["edge_popup"] = {**methods["edge_popup"], "score_decay": 5e-4}
    model_options = {"signed_supermask": {"classifier_bias": False},
                     "edge_popup": {"classifier_bias": False}}
  return cfg.replace(methods=methods, model_options=model_options)
