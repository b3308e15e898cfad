"""Train a backdoored model from scratch (BadNets-style data poisoning).

    python train_badnet.py --data_root /tmp/data/cifar10            # WRN-16-1, grid trigger, target 0
    python train_badnet.py --trigger_type blendTrigger --target_label 5 --output weight/s_net/blend.tar

Schedule: SGD (momentum 0.9, weight decay 5e-4, Nesterov), lr cosine-annealed per epoch
from --lr to 0 over --epochs. The final model is saved, never one chosen by test ASR.
"""
import math
import os
import time

import torch
import torch.nn.functional as F

from config import main_guard, parse_args
from data_loader import RunData, poison_train_set, train_batches
from models import select_model
from utils import check_writable, compiled, fit, make_meta, prepare_model, setup, summary_line

DEFAULTS = dict(epochs=20, batch_size=128, lr=0.1, weight_decay=5e-4, description=__doc__.split('\n')[0])


def main():
    args = parse_args(**DEFAULTS)
    args.arch = args.arch or 'WRN-16-1'
    device = setup(args)
    out = args.output or os.path.join(args.checkpoint_root, 's_net', f'{args.arch}.tar')
    csv_path = os.path.join(args.log_root, f'train_badnet_{os.path.splitext(os.path.basename(out))[0]}.csv')
    check_writable(out)
    check_writable(csv_path)
    t0 = time.time()
    data = RunData(args, device)
    attack = data.attack
    x, y, poisoned = poison_train_set(data.x_train, data.y_train, attack, data.num_classes, args.seed)
    print(f"{args.dataset}: {len(y)} training images, {len(poisoned)} poisoned with {attack['trigger_type']} "
          f"({attack['target_type']}, target {attack['target_label']}); {len(data.test['y_bd'])} backdoor test images")
    x, y = x.to(device), y.to(device)

    torch.manual_seed(args.seed)
    model = prepare_model(select_model(args.arch, data.num_classes), device)
    train_model = compiled(model, args)
    loss_fn = lambda xb, yb: F.cross_entropy(train_model(xb), yb)
    batches = lambda epoch: train_batches(x, y, args.batch_size, data.normalizer, args.seed, epoch,
                                          augment_data=not args.no_augment)
    lr_at = lambda epoch: args.lr * 0.5 * (1 + math.cos(math.pi * epoch / max(args.epochs, 1)))
    meta = make_meta(args, args.arch, data.num_classes, data.image_size, data.normalizer, attack, 'train_badnet.py')
    metrics = fit(args, model, loss_fn, batches, lr_at, data.test, data.normalizer, out_path=out, csv_path=csv_path,
                  meta=meta, nesterov=True, tag='badnet')
    print(f'saved {out} ({time.time() - t0:.0f}s); log {csv_path}')
    print(summary_line(metrics, args.json))


if __name__ == '__main__':
    main_guard(main)
