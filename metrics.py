"""The numbers every run reports: ACC (non-target test images, as the papers), ACC_all, ACC_target, ASR
and RA, and the one summary line (or JSON object) every script ends with."""
import json

import torch

from device import autocast
from models import eval_mode

METRICS = ('ACC', 'ACC_all', 'ACC_target', 'ASR', 'RA')  # the summary line, in this order


@torch.no_grad()
def predict(model, x, normalizer, batch_size, amp=False):
    preds = []
    for i in range(0, len(x), batch_size):
        with autocast(x.device, amp):
            preds.append(model(normalizer(x[i:i + batch_size])).argmax(1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=x.device)


def evaluate(model, test, normalizer, batch_size=1000, amp=False):
    """In percent: ACC on the non-target test images (the papers' number), ACC_all on all of them,
    ACC_target on the target class's (which ACC leaves out), ASR, RA, and per_class accuracy."""
    y = test['y_clean']
    with eval_mode(model):
        ok = predict(model, test['x_clean'], normalizer, batch_size, amp) == y
        p_bd = predict(model, test['x_bd'], normalizer, batch_size, amp)
    pct = lambda t: round(100.0 * t.float().mean().item(), 2) if t.numel() else 0.0
    return {'ACC': pct(ok[test['nontarget']]), 'ACC_all': pct(ok), 'ACC_target': pct(ok[y == test['target']]),
            'ASR': pct(p_bd == test['y_bd']), 'RA': pct(p_bd == test['y_bd_true']),
            'per_class': [pct(ok[y == c]) for c in range(test['num_classes'])]}


def accuracy(model, x, y, normalizer, batch_size, amp=False):
    """Accuracy (%) on uint8 images x with labels y (the defender's check on its own clean subset)."""
    with eval_mode(model):
        ok = predict(model, x, normalizer, batch_size, amp) == y
    return round(100.0 * ok.float().mean().item(), 2)


def summary_line(metrics, as_json=False):
    if as_json:
        return json.dumps({k: v for k, v in metrics.items()})
    return ' '.join(f'{k} {metrics[k]:.2f}' for k in METRICS)




def conv_norm(model):
    """The L2 norm of all conv weights together: under BatchNorm a step of lr acts like lr / |w|^2, so
    this says how hard a defense's lr hits the model (published WRN-16-1 checkpoints: 46-72)."""
    return float(torch.sqrt(sum(p.detach().float().pow(2).sum() for p in model.parameters() if p.dim() == 4)))
