"""Erase a backdoor with ARGD (default) or NAD: distil the backdoored student from a teacher
fine-tuned on a small clean subset.

    python main-ARGD.py --data_root /tmp/data/cifar10                  # shipped student and teacher
    python main-ARGD.py --defense KEY --s_model weight/s_net/blend.tar   # NAD, ARGD-SI: their keys in --help

The same driver as main_ft.py (defenses/driver.py), ARGD by default: any registered defense's key runs here.
If --t_model does not exist, a teacher is fine-tuned first (train_teacher.py) and saved there.
As published: SGD Nesterov (momentum 0.9, weight decay 1e-4), crop + flip + Cutout, lr 0.1 with
each defense's own steps and epochs (config.DEFENSES: ARGD 10 epochs, /10 at epoch 3 and 6; NAD 20
epochs, /10 at 2, /100 at 20). The erased model goes to
<checkpoint_root>/erasing_net/.

Not in the papers (ARGD-SI: its key, or --source inverted; file names <s_name>[-nad]-si): MCL's
detection's pattern (a synthesised trigger, main_ft.py's FT-SI) on --adv_share of each batch at true
labels. (PAM's path-aware gradient on top was measured not to help and is not kept: results/README.md.)
"""
from cli import main_guard, parse_args
from defenses.driver import defend

if __name__ == '__main__':
    main_guard(lambda: defend(parse_args('main-ARGD.py', description=__doc__.split('\n\n')[0])))
