"""Train a backdoored model from scratch (BadNets-style data poisoning).

    python train_badnet.py --data_root /tmp/data/cifar10                # WRN-16-1, grid trigger, target 0
                                        # (to weight/s_net/WRN-16-1.tar, or beside it if a model is there)
    python train_badnet.py --recipe nad --output weight/s_net/nad.tar   # NAD's reference recipe
    python train_badnet.py --trigger_type signalTrigger --target_label 5 --output weight/s_net/sig.tar
    torchrun --nproc_per_node 4 train_badnet.py --data_root /data/cifar10        # DDP, one GPU per process

--recipe picks one of the reference codes' training recipes (config.BADNET_RECIPES): 'mcl'
(default; MCL's train_badnet: crop + flip, CIFAR mean/std, SGD momentum 0.9, step lr),
'nad' (NAD's: no augmentation, raw [0,1] inputs, SGD Nesterov, constant lr), both with
weight decay 1e-4, or 'wanet' (BackdoorBench's WaNet: batches warped, then cropped, rotated and
flipped; 100 epochs, lr 0.01 constant, batch 128, weight decay 5e-4 unless flags say otherwise):

    python train_badnet.py --trigger_type wanetTrigger --recipe wanet --output wanet.tar
    python train_badnet.py --trigger_type wanetTrigger --recipe wanet --epochs 130 \
        --continue_from wanet.tar --output wanet-130.tar   # on to VinAI's lr /10 at epoch 100

The final model is saved, never one chosen by test ASR.
"""
import os
import time

import torch
import torch.nn.functional as F

from batching import train_batches
from checkpoints import load_checkpoint, make_meta
from cli import main_guard, parse_args
from config import BADNET_RECIPES
from data_loader import RunData, first_rank_first
from device import compiled, data_parallel, end_distributed, prepare_model, setup
from errors import UserError
from files import check_writable
from label_consistent import hard_images
from metrics import summary_line
from models import select_model
from poisoning import batch_poisoner, poison_train_set
from refool import reflection_trigger
from training import NOT_RESULT, Steps, fit, result_options
from utils import step_lr


def default_output(args):
    """<checkpoint_root>/s_net/<arch>.tar, the student the defenses read by default, unless a model is
    there already (the shipped one): a default never replaces a model, so the new one is named by its
    attack and seed (--output PATH writes where asked)."""
    plain = os.path.join(args.checkpoint_root, 's_net', f'{args.arch}.tar')
    if not os.path.exists(plain) or os.path.exists(plain + '.resume'):  # absent, or this run's own, interrupted
        return plain
    own = os.path.join(args.checkpoint_root, 's_net', f'{args.arch}-{args.trigger_type}-seed{args.seed}.tar')
    print(f'{plain} exists and is kept; this model goes to {own} (defend it with --s_model {own})')
    return own


def continue_from(args, model, meta, lr_at):
    """Load --continue_from's weights into model and return its epoch, after checking it was written by this
    script with this run's every result option but --epochs (fewer), the same trigger and the same lr in every
    epoch it trained (lr_at(epoch, epochs)): the epochs after it then see the batches and lr of one longer run
    (seeded by epoch); only SGD's momentum restarts."""
    ckpt = load_checkpoint(args.continue_from)
    old, epoch = ckpt.get('meta', {}), ckpt.get('epoch')
    if old.get('script') != 'train_badnet.py' or not isinstance(epoch, int):
        raise UserError(f'--continue_from {args.continue_from}: not a model train_badnet.py wrote')
    if epoch >= args.epochs:
        raise UserError(f'--continue_from {args.continue_from} was trained {epoch} epochs: --epochs must be more')
    saved = {k: v for k, v in old.get('args', {}).items() if k not in NOT_RESULT}
    for key in sorted(set(saved) | set(result_options(args))):
        if key in ('epochs', 'continue_from'):
            continue
        if saved.get(key, '(unset)') != result_options(args).get(key, '(unset)'):
            raise UserError(f'--continue_from {args.continue_from} was trained with --{key} '
                            f'{saved.get(key, "(unset)")}, this run has {result_options(args).get(key, "(unset)")}')
    mine, theirs = meta['attack']['trigger'], old.get('attack', {}).get('trigger', {})
    if set(mine) != set(theirs) or any(torch.is_tensor(v) and not torch.equal(v, theirs[k]) for k, v in mine.items()):
        raise UserError(f'--continue_from {args.continue_from} carries another trigger than this run makes')
    if [lr_at(e, epoch) for e in range(epoch)] != [lr_at(e) for e in range(epoch)]:
        raise UserError(f"--continue_from {args.continue_from}: recipe {args.recipe}'s lr schedule over {epoch} epochs "
                        f'is not the first {epoch} of {args.epochs} (its milestones scale with --epochs)')
    model.load_state_dict(ckpt['state_dict'])
    meta['continued_from'] = dict(file=os.path.basename(args.continue_from), epoch=epoch)
    print(f'continuing {args.continue_from} from epoch {epoch} to {args.epochs} (SGD momentum restarts from zero)')
    return epoch


def main():
    args = parse_args('train_badnet.py', description=__doc__.split('\n\n')[0])
    recipe = BADNET_RECIPES[args.recipe]
    for name, value in recipe.get('numbers', {}).items():  # a recipe's own numbers, where no flag sets them
        if name not in args.given:
            setattr(args, name, value)
    args.normalize = args.normalize or recipe['normalize']
    device = setup(args, distributed=True)
    out = args.output or default_output(args)
    csv_path = os.path.join(args.log_root, f'train_badnet_{os.path.splitext(os.path.basename(out))[0]}.csv')
    check_writable(out)
    check_writable(csv_path)
    t0 = time.time()
    trigger = None
    if args.trigger_type == 'refoolTrigger':  # Refool's reflections are chosen first, by their measured effect
        trigger = first_rank_first(lambda: reflection_trigger(args, device))
    data = RunData(args, device, trigger=trigger)
    attack = data.attack
    meta = make_meta(args, args.arch, data.num_classes, data.image_size, data.normalizer, attack, 'train_badnet.py')
    hard = None
    if attack['trigger_type'] == 'lcTrigger':  # the label-consistent attack stamps PGD images of the target class
        hard, meta['label_consistent'] = first_rank_first(lambda: hard_images(args, data, device))  # made once
        meta['attack']['trigger']['hard_images'] = meta['label_consistent']['key']  # the retuning attack's poison too
    x, y, poisoned = poison_train_set(data.x_train, data.y_train, attack, data.num_classes, args.seed, hard=hard)
    poison = batch_poisoner(attack, data.num_classes)
    what = f"{attack['inject_portion']:g} of each batch" if poison else f'{len(poisoned)}'
    print(f"{args.dataset}: {len(y)} training images, {what} poisoned with {attack['trigger_type']} "
          f"({attack['target_type']}, target {attack['target_label']}); {len(data.test['y_bd'])} backdoor test images; "
          f"recipe {args.recipe}: {args.epochs} epochs, lr {args.lr:g}, batch {args.batch_size}, weight decay {args.weight_decay:g}")
    x, y = x.to(device), y.to(device)

    torch.manual_seed(args.seed)
    model = prepare_model(select_model(args.arch, data.num_classes), device, args)
    train_model = data_parallel(compiled(model, args, device), device, args)
    loss_fn = lambda xb, yb: F.cross_entropy(train_model(xb), yb)
    augment = recipe['augment'] if not args.no_augment and data.crop_flip else False  # GTSRB: never (config.DATASETS)
    batches = lambda epoch: train_batches(x, y, args.batch_size, data.normalizer, args.seed, epoch,
                                          augment_data=augment, shard=(args.rank, args.world_size), poison=poison,
                                          poison_first=recipe.get('poison_first', False))
    milestones = lambda epochs: recipe.get('milestone_epochs') or [round(f * epochs) for f in recipe['milestones']]
    lr_at = lambda epoch, epochs=args.epochs: step_lr(args.lr, epoch, milestones(epochs), recipe['factors'])
    first_epoch = continue_from(args, model, meta, lr_at) if args.continue_from else 0
    metrics = fit(args, model, Steps(batches, loss_fn), lr_at, data.test, data.normalizer, out_path=out, csv_path=csv_path,
                  meta=meta, nesterov=recipe['nesterov'], tag='badnet', first_epoch=first_epoch)
    end_distributed(args)
    print(f'saved {out} ({time.time() - t0:.0f}s); log {csv_path}')
    print(summary_line(metrics, args.json))


if __name__ == '__main__':
    main_guard(main)
