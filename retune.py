"""The retuning attack (Min et al., NeurIPS 2024): is the backdoor gone, or only hidden? Fine-tune a
(purified) model on a few clean training images with a handful of poisoned ones among them, and see
whether the backdoor comes straight back.

    python retune.py --model weight/zoo/clean.tar --data_root /tmp/data/cifar10      # the floor: no backdoor
    python retune.py --model weight/erasing_net/WRN-16-1.tar --data_root /tmp/data/cifar10

As the paper: 2% of the training set with 5 poisoned images, SGD lr 0.01, momentum 0.9, no weight
decay, batch 128, 5 epochs (config.RETUNE), crop + flip. The images are a seeded draw disjoint from
the defender's clean subset of the same --seed and --ratio; the poison is the model's own attack
(its meta, or the attack flags). Prints the re-tuned model's summary; writes a model only with --output.
"""
import os

import torch.nn.functional as F

from batching import train_batches
from checkpoints import load_given_model
from cli import main_guard, parse_args
from data_loader import RunData
from files import check_writable
from label_consistent import cached_hard_images
from metrics import summary_line
from poisoning import retune_set
from training import Steps, fit


def main():
    args = parse_args('retune.py', description=__doc__.split('\n\n')[0])
    device, model, meta = load_given_model(args, 'retune.py')
    name = os.path.splitext(os.path.basename(args.model))[0]
    csv_path = os.path.join(args.log_root, f'retune_{name}.csv')
    for path in [csv_path] + ([args.output] if args.output else []):
        check_writable(path)
    data = RunData(args, device, meta)
    trigger = data.attack['trigger']  # a label-consistent attack's poison is its PGD images, stamped
    hard = cached_hard_images(args, data.x_train, trigger) if trigger['trigger_type'] == 'lcTrigger' else None
    x, y, _, poisoned = retune_set(data.x_train, data.y_train, data.attack, data.num_classes, args.ratio,
                                   args.retune_ratio, args.poisoned, args.seed, hard=hard)
    print(f"retuning set: {len(y)} training images ({args.retune_ratio:g}), {len(poisoned)} poisoned with "
          f"{data.attack['trigger_type']}, none in the defender's subset ({args.ratio:g}, seed {args.seed})")
    x, y = x.to(device), y.to(device)
    batches = lambda epoch: train_batches(x, y, args.batch_size, data.normalizer, args.seed, epoch,
                                          crop_flip=data.crop_flip)
    loss_fn = lambda xb, yb: F.cross_entropy(model(xb), yb)
    metrics = fit(args, model, Steps(batches, loss_fn), lambda epoch: args.lr, data.test, data.normalizer,
                  out_path=args.output, csv_path=csv_path, meta=dict(meta, retuned=True), evaluate_first=True,
                  tag='retune')
    if args.output:
        print(f'saved {args.output}')
    print(summary_line(metrics, args.json))


if __name__ == '__main__':
    main_guard(main)
