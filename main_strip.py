"""Filter triggered inputs at run time with STRIP (Gao et al., ACSAC 2019), a defense that leaves the model as it
is: each input is superimposed with --strip_n clean images of the defender's subset, and inputs whose predictions
stay confident (mean entropy below the threshold) are rejected. The threshold is set on the defender's own clean
subset at --strip_frr false rejections (the paper's 1%); the test sets only score it.

    python main_strip.py --s_model weight/zoo/blended.tar --data_root /tmp/data/cifar10

Prints, on --strip_images clean and triggered test images: FRR (clean test images rejected), FAR (triggered
ones accepted), AUROC, the model's ASR on them, and ASR_through: the triggered test images STRIP accepts and the
model sends to the target, the attack's success behind the filter.
"""
import time

from cli import main_guard, parse_args
from config import STRIP_BATCH
from data_loader import test_subset
from defenses import defense_setup
from defenses.strip import auroc, strip_entropy, threshold_at
from metrics import predict, summary_line


def main():
    args = parse_args('main_strip.py', description=__doc__.split('\n\n')[0])
    run = defense_setup(args)
    model, norm, n = run.model.eval(), run.data.normalizer, args.strip_n
    score = lambda x, stream: strip_entropy(model, x, run.x, norm, n, args.seed, stream, STRIP_BATCH, args.amp)
    own = score(run.x[:args.strip_images], 'strip-defender')
    threshold = threshold_at(own, args.strip_frr)
    print(f"threshold {threshold:.4f} bits: the {args.strip_frr:g} quantile of the normal fitted to {len(own)} of the "
          f"defender's clean images (mean {float(own.mean()):.4f}, std {float(own.std()):.4f})", flush=True)
    test = test_subset(run.data.test, args.strip_images, args.seed)
    t0 = time.time()
    clean, triggered = score(test['x_clean'], 'strip-clean'), score(test['x_bd'], 'strip-triggered')
    accepted = triggered >= threshold
    hits = predict(model, test['x_bd'], norm, args.eval_batch_size, args.amp) == test['y_bd']
    pct = lambda t: round(100.0 * t.float().mean().item(), 2)
    metrics = dict(FRR=pct(clean < threshold), FAR=pct(accepted), AUROC=round(100 * auroc(clean, triggered), 2),
                   ASR=pct(hits), ASR_through=pct(accepted & hits), threshold=round(threshold, 4),
                   images=[len(clean), len(triggered)], n=n, seconds=round(time.time() - run.started, 1))
    print(f"{len(clean)} clean and {len(triggered)} triggered test images, {n} overlays each "
          f"({time.time() - t0:.0f}s): entropy clean {float(clean.mean()):.3f}, triggered {float(triggered.mean()):.3f}")
    print(summary_line(metrics, True) if args.json else
          ' '.join(f'{k} {metrics[k]:.2f}' for k in ('FRR', 'FAR', 'AUROC', 'ASR', 'ASR_through')))


if __name__ == '__main__':
    main_guard(main)
