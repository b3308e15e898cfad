"""Erase a backdoor by fine-tuning past superficial safety: PAM (default), FST, SAU, the blind baselines
FT-AT and FT-SI, or the papers' classic defenses NC, I-BAU and MCR. Each sees only the defender's clean
subset (--ratio); none is told the trigger or the target.

    python main_ft.py --s_model weight/zoo/blended.tar --data_root /tmp/data/cifar10                # PAM
    python main_ft.py --defense fst --s_model weight/zoo/sig-cl.tar --data_root /tmp/data/cifar10
    python main_ft.py --defense ft-at --s_model weight/zoo/blended.tar --data_root /tmp/data/cifar10
    python main_ft.py --defense ft-si --s_model weight/zoo/blended.tar --data_root /tmp/data/cifar10  # FT-SI

- ft-at: FT's recipe (train_teacher.py) with --adv_share of each batch replaced by untargeted PGD images
  (L_inf --adv_eps) of the model as given (--adv_against original) at their true labels; with --source
  inverted (FT-SI) the share is stamped instead with MCL's detection's pattern, a synthesised trigger.
- pam: the same images, the cross-entropy gradient taken --rho towards the backdoored weights (Min et
  al., NeurIPS 2024); SGD lr 0.01, momentum 0.1, 30 epochs, batch 128.
- fst: re-initialised head, cross-entropy + --alpha <W, W_orig>, the head's norm kept (Min et al.,
  NeurIPS 2023); SGD lr 0.01, momentum 0.9, cosine over 10 epochs, batch 128.
- sau: shared adversarial unlearning (Wei et al., NeurIPS 2023); Adam lr 1e-4, cosine, batch 256, BN
  frozen, 12 epochs (the reference's 100 do not fit 5 minutes here).
- nc: Neural Cleanse (Wang et al., S&P 2019): a mask and pattern reverse-engineered per class, the
  outliers flagged (anomaly index >= 2), 1 epoch of unlearning with their triggers on 20% of each batch.
- i-bau: implicit backdoor adversarial unlearning (Zeng et al., ICLR 2022): a universal perturbation per
  round, the weights updated through the implicit hypergradient; Adam lr 0.001, 5 rounds, batch 100.
- mcr: mode connectivity repair (Zhao et al., ICLR 2020): a Bezier curve from the model to FT's teacher
  (--t_model, fine-tuned first if absent), its point t chosen on a held-out tenth of the clean subset.
Recipes: config.DEFENSES (`--defense KEY --help` shows the values it runs with); a flag overrides one.
The final model goes to <checkpoint_root>/<tag>_net/<s_name>.tar (never picked by test metrics), the
per-epoch CSV to <log_root>/<tag>_<s_name>.csv; tag = the defense, ft-si or pam-si.
"""
import os

import torch

import defenses
from cli import main_guard, parse_args
from config import DEFENSES
from defenses import defense_meta, defense_setup, finish
from files import check_writable
from training import fit
from utils import schedule


def run_tag(args):
    """The run's name in files and logs: the defense, or ft-si / pam-si with a synthesised trigger."""
    base = 'ft-at' if args.defense == 'ft-si' else args.defense
    if args.source == 'inverted' and 'source' in DEFENSES[args.defense]:
        return 'ft-si' if base == 'ft-at' else f'{base}-si'
    return base


def main():
    args = parse_args('main_ft.py', description=__doc__.split('\n\n')[0])
    recipe = DEFENSES[args.defense]
    run = defense_setup(args)
    tag = run_tag(args)
    out = args.output or os.path.join(args.checkpoint_root, f'{tag}_net', f'{run.s_name}.tar')
    csv_path = os.path.join(args.log_root, f'{tag}_{run.s_name}.csv')
    for path in (out, csv_path):
        check_writable(path)

    torch.manual_seed(args.seed)
    steps = defenses.module(args.defense).build(args, run)
    metrics = fit(args, run.model, steps, schedule(recipe, args.lr, args.epochs), run.data.test, run.data.normalizer,
                  out_path=out, csv_path=csv_path, meta=dict(defense_meta(run.meta, args, tag), **steps.meta),
                  nesterov=recipe['nesterov'], evaluate_first=True, tag=tag, optimizer=recipe['optimizer'])
    metrics.update(steps.meta)  # which class's pattern FT-SI / PAM-SI stamped (in the JSON summary and the meta)
    finish(run, run.model, args, metrics, out, csv_path)


if __name__ == '__main__':
    main_guard(main)
