"""Fine-tune the backdoored model on the clean subset: ARGD/NAD's teacher, and the FT baseline.

    python train_teacher.py --data_root /tmp/data/cifar10            # weight/s_net/WRN-16-1.tar -> weight/t_net/
    python train_teacher.py --s_model weight/s_net/blend.tar --ratio 0.05 --teacher_epochs 10

The recipe is NAD's teacher (defenses/ft.py, config.DEFENSES['ft']): all layers, cross-entropy, crop +
flip + Cutout, SGD Nesterov, --teacher_lr for epochs 0-1 and a tenth of it after.
"""
from cli import main_guard, parse_args
from defenses.driver import defend

if __name__ == '__main__':
    main_guard(lambda: defend(parse_args('train_teacher.py', description=__doc__.split('\n\n')[0])))
