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

MCL-TK (its key in --help, or --keep_target; not in the paper) keeps the target class: the clean images the
model assigns to the target are left out of the contrastive term, whose push away from the triggered
features would push them away from their own class, and cross-entropy on the clean images anchors every
class (defenses/mcl.py). Output: <tag>_net/ and <tag>_* files. The same driver as main_ft.py: any registered
defense's key runs here.
"""
from cli import main_guard, parse_args
from defenses.driver import defend

if __name__ == '__main__':
    main_guard(lambda: defend(parse_args('main_mcl.py', description=__doc__.split('\n\n')[0])))
