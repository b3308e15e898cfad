"""Run any registered defense on a backdoored model (defenses/driver.py): --defense KEY, default pam. Each sees
only the defender's clean subset (--ratio); a blind one is told neither the trigger nor the target.

    python main_ft.py --s_model weight/zoo/blended.tar --data_root /tmp/data/cifar10                 # the default
    python main_ft.py --defense KEY --s_model weight/zoo/sig-cl.tar --data_root /tmp/data/cifar10
    python main_ft.py --defense KEY --help                # its options, with the values it runs with

`--help` lists the keys (config.DEFENSES); what each does, after which paper and reference code: its module's
docstring in defenses/ (the README's table of defenses). Recipes: config.DEFENSES; a flag overrides one. The
final model goes to <checkpoint_root>/<tag>_net/<s_name>.tar (never picked by test metrics; FT's to t_net/, NAD's
and ARGD's to erasing_net/ as main-ARGD.py writes them), the per-epoch CSV to <log_root>/<tag>_<s_name>.csv; tag =
the key, or its variant's (a synthesised trigger: ft-si, pam-si; FT: teacher).
"""
from cli import main_guard, parse_args
from defenses.driver import defend

if __name__ == '__main__':
    main_guard(lambda: defend(parse_args('main_ft.py', description=__doc__.split('\n\n')[0])))
