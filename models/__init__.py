"""Model zoo: select_model(name, num_classes).

Every model's forward(x) returns logits; forward(x, features=True) returns
(logits, (a1, a2, a3), pooled): the three group activations used by AT/NAD/ARGD and the
pooled feature used by MCL; to_features(x) the map the head pools and from_features(f) the logits of one (BTI-DBF).
models/unet.py: BTI-DBF's trigger generator (not a classifier).
"""
import contextlib

from .resnet import ResNet18, ResNet34
from .wresnet import WideResNet

MODELS = {
    'WRN-10-1': lambda c: WideResNet(10, c, 1),
    'WRN-10-2': lambda c: WideResNet(10, c, 2),
    'WRN-16-1': lambda c: WideResNet(16, c, 1),
    'WRN-16-2': lambda c: WideResNet(16, c, 2),
    'WRN-40-1': lambda c: WideResNet(40, c, 1),
    'WRN-40-2': lambda c: WideResNet(40, c, 2),
    'ResNet18': ResNet18,
    'ResNet34': ResNet34,
}


def select_model(name, num_classes):
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}' (choose from {', '.join(MODELS)})")
    return MODELS[name](num_classes)


@contextlib.contextmanager
def eval_mode(model):
    """The block runs with the model in eval mode (BatchNorm's running statistics); its mode is put back after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
