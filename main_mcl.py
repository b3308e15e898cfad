"""Erase a backdoor with MCL: invert the trigger on the clean subset, then model-contrastive
fine-tuning. With --mcl_target auto (default) the target is detected first (Neural Cleanse's
rule). MCL never sees the attack: --target_label and the other attack options (or the
checkpoint's meta) only say what evaluation scores against.

    python main_mcl.py --data_root /tmp/data/cifar10                  # detect the target, then erase
    python main_mcl.py --mcl_target 0 --data_root /tmp/data/cifar10   # tell MCL the target
    python main_mcl.py --epochs 0 --data_root /tmp/data/cifar10       # detection only

As published: inversion over --inv_epochs 100 passes of the clean subset; erasing with SGD
momentum 0.9, weight decay 1e-4, lr 0.1 for epoch 0, 0.01 to epoch 9, 0.001 after
(config.DEFENSES['mcl']), no augmentation, no ragged last batch. Output:
<checkpoint_root>/mcl_net/<s_name>.tar, the CSV and a picture of the inverted trigger under --log_root.

--defense mcl-tk (or --keep_target; MCL-TK, not in the paper) keeps the target class: the clean images the
model assigns to the target are left out of the contrastive term, whose push away from the triggered
features would push them away from their own class, and cross-entropy on the clean images anchors every
class (defenses/mcl.py). Output: mcl-tk_net/ and mcl-tk_* files.
"""
import os
import time

import defenses
from cli import main_guard, parse_args
from config import DEFENSES
from defenses import defense_meta, defense_setup, finish
from errors import UserError
from files import check_writable
from inversion import find_target, invert_triggers, trigger_picture
from metrics import evaluate, summary_line
from training import fit
from triggers import apply_trigger
from utils import schedule


def invert(args, run, targets, passes, report=None):
    return invert_triggers(run.model, run.x, targets, run.data.normalizer, passes, args.batch_size, args.inv_patience,
                           args.asr_bound, args.init_cost, seed=args.seed, amp=args.amp, report=report)


def true_target(args, run):
    """How the evaluation's target is known, for the detection line."""
    label = run.data.attack['target_label']
    if 'target_label' not in args.given and 'target_label' not in run.meta.get('attack', {}):
        return f'true target unknown: no meta, no --target_label; scored against {label} (config.ATTACK)'
    return f'true target {label}'


def main():
    args = parse_args('main_mcl.py', description=__doc__.split('\n\n')[0])
    recipe = DEFENSES[args.defense]
    run = defense_setup(args)
    model, data = run.model, run.data
    tag = 'mcl-tk' if args.keep_target else 'mcl'
    csv_path = os.path.join(args.log_root, f'{tag}_{run.s_name}.csv')
    png_path = os.path.join(args.log_root, f'{tag}_{run.s_name}_trigger.png')
    out = args.output or os.path.join(args.checkpoint_root, f'{tag}_net', f'{run.s_name}.tar')
    for path in (out, csv_path, png_path):
        check_writable(path)

    # MCL is told only --mcl_target; evaluation scores against the true attack (meta or attack flags)
    truth = true_target(args, run)
    target, detected = (None if args.mcl_target == 'auto' else int(args.mcl_target)), None
    if target is None:
        target, index, max_index, smallest, detected = find_target(
            run.model, run.x, run.data.normalizer, run.data.num_classes, args.detect_epochs, args.batch_size,
            args.inv_patience, args.asr_bound, args.init_cost, args.seed, args.amp)
        if target is None:
            print(f'no target label detected (max anomaly index {max_index:.2f})')
            if not args.force or args.epochs == 0:
                print('the model looks clean: left unchanged (--force erases with the smallest-pattern class)')
                print(summary_line(evaluate(model, data.test, data.normalizer, args.eval_batch_size, args.amp),
                                   args.json))
                return
            target = smallest
            print(f'--force: erasing with class {target}, the smallest pattern')
        else:
            print(f'detected target label: {target} ({truth}; anomaly index {index:.2f})')
    if not 0 <= target < data.num_classes:
        raise UserError(f'--mcl_target {target} is outside [0, {data.num_classes})')

    t_inv = time.time()
    if detected and args.epochs == 0:  # detection only: picture the pattern detection found
        pattern, info = detected[target]
    else:  # erasing gets the full inversion budget
        (pattern, info), = invert(args, run, [target], args.inv_epochs, report=lambda text: print(text, flush=True))
    if not info['found']:
        print(f'no pattern reached {100 * args.asr_bound:.0f}% success in {info["passes"]} passes: as the reference, '
              'the inverted pattern is all zero: positive and negative features are equal, the contrastive loss has no '
              'gradient, and erasing changes the model only through weight decay')
    print(f"inverted trigger for class {target}: {info['pixels']} pixels, L1 {info['l1']:.2f}, "
          f"success {100 * info['asr']:.1f}% on the clean subset after {info['passes']} passes "
          f"({time.time() - t_inv:.1f}s)", flush=True)
    real = apply_trigger(data.attack['trigger'], data.x_train[:1])[0]
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    trigger_picture(pattern.cpu(), data.x_train[0], real).save(png_path)
    if args.epochs == 0:
        print(summary_line(evaluate(model, data.test, data.normalizer, args.eval_batch_size, args.amp), args.json))
        return

    steps = defenses.module(args.defense).build(args, run, target, pattern)
    meta = dict(defense_meta(run.meta, args, tag),
                mcl={'target_label': target, 'pattern': pattern.cpu(), 'pixels': info['pixels']})
    metrics = fit(args, model, steps, schedule(recipe, args.lr, args.epochs), data.test, data.normalizer, out_path=out,
                  csv_path=csv_path, meta=meta, nesterov=recipe['nesterov'], evaluate_first=True, tag=tag)
    finish(run, model, args, metrics, out, csv_path, f'trigger picture {png_path}')


if __name__ == '__main__':
    main_guard(main)
