"""Evaluate a checkpoint: ACC on non-target test images, ACC on all, ASR and RA.

    python evaluate.py --model weight/s_net/WRN-16-1.tar --data_root /tmp/data/cifar10
    python evaluate.py --model published.pth.tar --arch WRN-16-1 --trigger_type gridTrigger \
        --target_label 5 --normalize cifar --data_root /tmp/data/cifar10

The attack comes from the checkpoint's meta; flags override it (needed for checkpoints
that carry only a state_dict).
"""
from checkpoints import load_given_model
from cli import main_guard, parse_args
from data_loader import RunData
from metrics import conv_norm, evaluate, summary_line


def main():
    args = parse_args('evaluate.py', description=__doc__.split('\n\n')[0])
    device, model, meta = load_given_model(args, 'evaluate.py')
    data = RunData(args, device, meta)
    a, norm = data.attack, round(conv_norm(model), 2)
    print(f"{args.model}: {meta['arch']}, {a['trigger_type']} {a['target_type']} target {a['target_label']}, "
          f"{len(data.test['y_clean'])} clean / {len(data.test['y_bd'])} backdoor test images, conv weight norm {norm}")
    metrics = evaluate(model, data.test, data.normalizer, args.eval_batch_size, args.amp)
    print(summary_line(dict(metrics, conv_norm=norm), args.json))


if __name__ == '__main__':
    main_guard(main)
