"""MCR's rule recomputed on a finished curve, from the model it wrote (a diagnosis, not a defense): the bend is
solved from the written point t (w = (1-t)^2 start + 2t(1-t) bend + t^2 end), then each point of the path is
rebuilt, its BatchNorm re-estimated as the defense does, and the held-out tenth's per-image losses printed with the
paired differences the rule reads and the point it chooses. Defender-side numbers only.

    PYTHONPATH=. python results/mcr_probe.py MODEL END WRITTEN T [main_ft.py options]
    PYTHONPATH=. python results/mcr_probe.py weight/zoo/badnet.tar mcr_end/badnet.tar mcr_net/badnet.tar 0.9 \
        --data_root $CIFAR --seed 0 --threads 1
"""
import sys

import torch

import defenses.mcr as mcr
from checkpoints import load_model
from cli import parse_args
from defenses import clean_batches, defense_setup

s_model, end_path, written, t_written = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
args = parse_args('main_ft.py', ['--defense', 'mcr', '--s_model', s_model, *sys.argv[5:]])
run = defense_setup(args)
end = dict(load_model(end_path, args, run.data.num_classes, run.device)[0].named_parameters())
point = dict(load_model(written, args, run.data.num_classes, run.device)[0].named_parameters())
start = {n: p.detach().clone() for n, p in run.model.named_parameters()}
a, b, c = (1 - t_written) ** 2, 2 * t_written * (1 - t_written), t_written ** 2
bend = {n: (point[n].detach() - a * start[n] - c * end[n].detach()) / b for n in start}
fit, held = mcr.split(len(run.y), args.mcr_held_out, args.seed)
batches = clean_batches(args, run, images=mcr.tiled(run.x[fit], run.y[fit], args.mcr_epoch_images))
losses = {}
for t in mcr.PATH:
    with torch.no_grad():
        for n, p in run.model.named_parameters():
            p.copy_(mcr.bezier(t, start[n], bend[n], end[n].detach()))
    mcr.update_bn(run.model, batches(args.epochs), args.amp)
    losses[t], ok = mcr.losses(run.model, run.x[held], run.y[held], run.data.normalizer, args.eval_batch_size, args.amp)
    print(f't {t:.1f}: held-out accuracy {100 * ok.float().mean():.2f}, loss {losses[t].mean():.4f}', flush=True)
ref = losses[mcr.GRID[-1]]
for t in mcr.GRID[:-1]:
    d = losses[t] - ref
    print(f't {t:.1f}: paired difference from t = {mcr.GRID[-1]:g} {d.mean():+.4f}, '
          f'{mcr.SIGNIFICANT:g} standard errors {mcr.SIGNIFICANT * d.std() / len(d) ** 0.5:.4f}')
print(f'the rule chooses t = {mcr.first_faded(losses):g}')
