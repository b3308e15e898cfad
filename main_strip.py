"""Filter triggered inputs at run time with STRIP (Gao et al., ACSAC 2019), a defense that leaves the model as it
is: each input is superimposed with --strip_n clean images of the defender's subset, and inputs whose predictions
stay confident (mean entropy below the threshold) are rejected. The threshold is set on the defender's own clean
subset at --strip_frr false rejections (the paper's 1%); the test sets only score it.

    python main_strip.py --s_model weight/zoo/blended.tar --data_root /tmp/data/cifar10   # = main_ft.py --defense strip

Prints, on --strip_images clean and triggered test images: FRR (clean test images rejected), FAR (triggered
ones accepted), AUROC, the model's ASR on them, and ASR_through: the triggered test images STRIP accepts and the
model sends to the target, the attack's success behind the filter.
"""
from cli import main_guard, parse_args
from defenses.driver import defend

if __name__ == '__main__':
    main_guard(lambda: defend(parse_args('main_strip.py', description=__doc__.split('\n\n')[0])))
