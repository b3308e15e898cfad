"""Is the erasure superficial? ASR and ACC along the straight line from the backdoored weights to a
defended model's (Min et al., NeurIPS 2024, read superficial safety off this path: a purified model
that stays close to the backdoored one shows a high ASR a short way back along it).

    python interpolate.py --model weight/pam_net/blended.tar --from weight/zoo/blended.tar --data_root /tmp/data/cifar10

Every tensor of the state (weights and BatchNorm statistics) is (1 - t) * backdoored + t * defended at
--points values of t from 0 (the backdoored model) to 1 (the defended one), each scored on a fixed
--eval_subset of the test sets against the defended model's attack (its meta, or the attack flags).
"""
from checkpoints import load_given_model, load_model
from cli import main_guard, parse_args
from data_loader import RunData
from device import unwrap
from errors import UserError
from metrics import evaluate, summary_line
from subsets import test_subset


def interpolated(model, start, end, t):
    """Load (1 - t) * start + t * end into model (integer buffers: the defended model's)."""
    model.load_state_dict({k: (start[k] + t * (v - start[k])) if v.is_floating_point() else v for k, v in end.items()})


def main():
    args = parse_args('interpolate.py', description=__doc__.split('\n\n')[0])
    if not args.start:
        raise UserError('interpolate.py needs --from PATH (the backdoored model the defense started from)')
    device, model, meta = load_given_model(args, 'interpolate.py')
    start_model, _ = load_model(args.start, args, meta['num_classes'], device)
    end = {k: v.clone() for k, v in unwrap(model).state_dict().items()}
    start = unwrap(start_model).state_dict()
    if start.keys() != end.keys() or any(start[k].shape != v.shape for k, v in end.items()):
        raise UserError(f'{args.start} and {args.model} are not the same architecture')
    data = RunData(args, device, meta)
    test = test_subset(data.test, args.eval_subset, args.seed) if args.eval_subset else data.test
    path = []
    for i in range(args.points):
        t = i / (args.points - 1)
        interpolated(model, start, end, t)
        m = evaluate(model, test, data.normalizer, args.eval_batch_size, args.amp)
        path.append(dict(t=round(t, 4), ACC=m['ACC'], ASR=m['ASR'], RA=m['RA']))
        print(f"t {t:.2f}  ACC {m['ACC']:6.2f}  ASR {m['ASR']:6.2f}  RA {m['RA']:6.2f}", flush=True)
    asr = ' '.join(f"{p['ASR']:.1f}" for p in path)
    print(summary_line(dict(path=path, **{k: path[-1][k] for k in ('ACC', 'ASR', 'RA')}), True) if args.json else
          f'ASR along the path from t=0 to 1: {asr}')

if __name__ == '__main__':
    main_guard(main)
