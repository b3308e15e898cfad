"""The command-line options, in groups of what they set: each group a function of `add` (argparse's
add_argument, with an optional minimum), declared once. cli.SCRIPTS lists the groups each script reads; a
defense module (defenses/) declares the groups its run reads beside its own options. Defaults come from
config.py (cli.script_defaults), never from here."""
import argparse

import config
from models import MODELS
from triggers import TRIGGERS

TARGET_TYPES = ('all2one', 'all2all', 'cleanLabel')


def numbers(text):
    """'2,20' -> (2, 20): a tuple option (milestones, factors) on the command line."""
    return tuple(float(v) if any(c in v for c in '.e') else int(v) for v in text.split(',') if v.strip())


def run(a):
    a('--dataset', help=f'data set: {", ".join(config.DATASETS)}')
    a('--data_root', help='the data set (downloaded here when absent), or an image-folder tree '
      '<root>/train/<class>/*, <root>/test/<class>/* (used offline, even for CIFAR10)')
    a('--seed', type=int, help='fixes data subsets, poisoned indices, augmentation and initialisation')
    a('--device', help="'cuda', 'cpu', ... (default: cuda when available, else cpu)")
    a('--threads', type=int, help='CPU threads for torch (default: torch chooses)')
    a('--precision', choices=('auto', 'fp32', 'bf16', 'fp16'), help='auto = what ran fastest: bf16 autocast on CPUs '
      'with AMX or AVX512-BF16, fp32 on TF32 tensor cores on GPUs of compute capability >= 8.0 (bf16 autocast was '
      'slower there), fp16 autocast with loss scaling on older GPUs with tensor cores (V100, T4), else fp32 '
      '(default: auto)')
    a('--deterministic', action='store_true', help="CUDA: cuDNN's deterministic kernels and torch's deterministic "
      'algorithms, so a run repeats bit for bit on one GPU (slower; the CPU is deterministic without it)')
    a('--eval_batch_size', type=int, help='evaluation batch size (default: 256 on CPU, 1000 on CUDA)')
    a('--cuda_graphs', choices=('off', 'on'), help="on: replay the model's fixed-shape fp32 calls (training steps, "
      'evaluation batches, MCL\'s inversion) as CUDA graphs, each captured on its first call; the CPU ignores it '
      '(not yet measured on a GPU, hence off)')
    a('--json', action='store_true', help='print the final summary as one JSON object')


def model(a):
    a('--arch', help=f'architecture, where no checkpoint meta says it: {", ".join(MODELS)}')
    a('--num_class', type=int, help='number of classes (default: meta, else the data set\'s)')
    a('--image_size', type=int, help='image side in pixels; image folders are resized to it (default: meta, else 32)')
    a('--normalize', help="input normalisation the model expects: 'cifar' (CIFAR mean/std), 'none' (raw [0,1]), "
      "or 'm1,m2,m3,s1,s2,s3' (default: meta, else the recipe's, else the data set's)")


def attack(a):
    a('--target_label', type=int, help='attack target class, where no meta says it')
    a('--trigger_type', help=f'trigger, where no meta says it: {", ".join(TRIGGERS)}')
    a('--target_type', help=f'label rule, where no meta says it: {", ".join(TARGET_TYPES)}')
    a('--inject_portion', type=float, help='poisoned fraction of the training set in [0, 1] (cleanLabel: of the '
      'target-class images; 0: a clean control model)')
    a('--trig_w', type=int, help="squareTrigger: the square's extent down the image, in rows (named as the "
      "references name it; their 'width' runs along the first image axis)")
    a('--trig_h', type=int, help="squareTrigger: the square's extent across the image, in columns")
    a('--trigger_path', help="trojanTrigger's pattern (required): an .npz added as the references add "
      "best_square_trigger_cifar10.npz, or an image stamped as MCL stamps trigger_gtsrb.png; blendedTrigger's "
      "image (default: a fixed noise image); refoolTrigger's reflections: another data set's image folder")


def schedule(a):
    a('--epochs', type=int, help='training epochs')
    a('--lr', type=float, help='initial learning rate (the schedule is per script, see README)')


def train(a):
    a('--batch_size', type=int, help='training batch size')
    a('--momentum', type=float, help='SGD momentum')
    a('--weight_decay', type=float, help='SGD weight decay')
    a('--eval_every', type=int, help='evaluate on the test sets every k epochs (always after the last)')
    a('--eval_subset', type=int, help='per-epoch rows score a fixed random N images of each test set (0 = all); '
      'the final model is always scored on all of them')
    a('--log_root', help='per-run CSV logs are written under this folder')
    a('--checkpoint_root', help='models are read and written under this folder')
    a('--output', help='where the final model is written (default: per script)')
    a('--resume', action='store_true', help='continue an interrupted run from its <output>.resume file')


def badnet(a):
    a('--recipe', choices=tuple(config.BADNET_RECIPES), help='reference training recipe (config.BADNET_RECIPES)')
    a('--no_augment', action='store_true', help='no random crop/flip even if the recipe has them')
    a('--compile', choices=('auto', 'on', 'off'), help='torch.compile the model; auto: on the CPU where a C++ '
      'compiler is found, never on CUDA (measured slower there; on: where triton is found)')
    a('--continue_from', help="a final model this script wrote with these options but fewer --epochs: train on from "
      "its epoch, the same batches and lr as one longer run (only SGD's momentum restarts from zero)")


def defense(a):
    a('--s_model', help='model under defense (default: <checkpoint_root>/s_net/<arch>.tar)')
    a('--ratio', type=float, help='fraction of the training set the defense may use (clean), in (0, 1]')


def choose(a):
    a('--defense', help='the defense (config.DEFENSES); `--defense KEY --help` shows the values it runs with')


def teacher(a, model_help=None):
    """The teacher a defense distils from or ends its curve at: FT's model (its numbers: FT's entry)."""
    a('--t_model', help=model_help or 'teacher model (default: <checkpoint_root>/t_net/<s_name>.tar; fine-tuned from '
      '--s_model first if the file does not exist)')
    a('--teacher_epochs', type=int, help='epochs of teacher fine-tuning')
    a('--teacher_lr', type=float, minimum=0, help="initial lr of teacher fine-tuning (its schedule: FT's)")


def recipe(a):
    """How a defense trains (each defense's entry in config.DEFENSES): the training options, and the recipe's."""
    train(a)
    a('--optimizer', choices=('sgd', 'adam'), help='sgd (momentum, weight decay, Nesterov as set) or adam')
    a('--nesterov', action=argparse.BooleanOptionalAction, help='SGD with Nesterov momentum')
    a('--schedule', choices=('step', 'cosine', 'curve', 'constant'), help="the lr schedule: step (lr x factors[i] "
      "from the i-th milestone epoch), cosine (per epoch), curve (MCR's), constant")
    a('--milestones', type=numbers, help="step schedule: comma-separated epochs where the lr takes the next factor")
    a('--factors', type=numbers, help='step schedule: comma-separated lr multipliers, one more than the milestones')
    a('--augment', action=argparse.BooleanOptionalAction, help='random crop + flip (where the data set has them) and '
      'Cutout of --cutout')
    a('--drop_last', action=argparse.BooleanOptionalAction, help='no ragged last batch')
    a('--cutout', type=int, minimum=0, help='Cutout length of the augmentation (0 = crop + flip only)')


def attention(a):
    """NAD's and ARGD's attention maps."""
    a('--p', type=float, help='AT: power of |activation| in the attention map')


def detection(a):
    """Trigger inversion's numbers: MCL's target detection, and the synthesised trigger (--source inverted)."""
    a('--inv_patience', type=int, minimum=0, help='inversion: stop after this many passes without a smaller pattern '
      '(0 = never, as the reference)')
    a('--detect_epochs', type=int, minimum=1, help='inversion passes per class when detecting the target')
    a('--asr_bound', type=float, help='inversion: attack success a pattern must reach to count')
    a('--init_cost', type=float, help='inversion: initial weight of the pattern-size penalty')


def inversion(a):
    """MCL's own inversion: told or detected target, its budget."""
    a('--mcl_target', help="MCL: the target label MCL is told, or 'auto' to detect it (evaluation always scores "
      "against the true attack: the checkpoint's meta or --target_label)")
    a('--inv_epochs', type=int, minimum=1, help='MCL: passes over the clean subset (--batch_size batches) of trigger inversion')
    a('--force', action='store_true', help='MCL: erase even when no target label is detected')


def interpolate(a):
    a('--model', help='the defended checkpoint (the end of the path)')
    a('--from', dest='start', help='the backdoored checkpoint the defense started from (the start of the path)')
    a('--points', type=int, help='points on the path, both ends included')
    a('--eval_subset', type=int, help='score a fixed random N images of each test set at each point (0 = all)')


def share(a):
    a('--adv_share', type=float, help='share of each batch replaced by PGD, synthesised-trigger or reversed-trigger '
      'images at their true labels')


def source(a):
    a('--source', help="the share's images: pgd (FT-AT, PAM: untargeted PGD per batch), inverted (MCL's "
      "detection's pattern, a synthesised trigger: the -SI variants), none (ARGD, NAD: no share)")
    detection(a)


def strip(a):
    a('--strip_n', type=int, minimum=1, help='STRIP: clean overlays superimposed on each input')
    a('--strip_frr', type=float, help="STRIP: false rejection rate the threshold is set at, on the defender's clean subset")
    a('--strip_images', type=int, minimum=1, help='STRIP: test images of each set scored, and defender images for the threshold')
    a('--strip_threshold', choices=('quantile', 'normal'), help="STRIP: the threshold is the --strip_frr quantile of "
      "the defender's entropies (quantile) or of the normal fitted to them (normal: the paper's)")


def attack_from(a):
    a('--attack_from', help="score against the attack in this checkpoint's meta instead of the model's own "
      '(a clean control under another model\'s trigger)')


def evaluate(a):
    a('--model', help='the checkpoint to evaluate')


def retune(a):
    a('--model', help='the checkpoint to re-tune')
    a('--ratio', type=float, help="the defender's clean fraction: the retuning images are drawn apart from it")
    a('--retune_ratio', type=float, help='fraction of the training set the retuning attack uses, in (0, 1]')
    a('--poisoned', type=int, help="how many of its images carry the model's trigger")


def benchmark(a):
    a('--batch_size', type=int, help='training batch size of the timed steps')
    a('--time_compiled', action='store_true', help='also time the train step under torch.compile')
    a('--checkpoint_root', help='--end_to_end: where the shipped models are')
    a('--end_to_end', action='store_true', help='also time every defense (the table\'s '
      'columns) end to end on --data_root with the shipped model (half an hour on a 2-core CPU)')
    a('--defenses', help='--end_to_end: the comma-separated defenses to time (default: every one)')
    a('--pieces', action=argparse.BooleanOptionalAction, help='time the pieces (--no-pieces: only --end_to_end)')


def table_dir(a):
    a('--table_dir', help='where table.csv, table.md, the cell files and the logs go')


def table_run(a):
    a('--attacks', help='rows of the table (see the README; trojan needs --trojan_pattern)')
    a('--defenses', help='comma-separated columns of the table (default: every one: none, each defense that changes '
      'the model, floor)')
    a('--seeds', help='comma-separated defense seeds (clean subset, teacher, initialisation)')
    a('--model_seed', type=int, help="the backdoored models' seed; 0 uses <checkpoint_root>/zoo/<attack>.tar where "
      'it exists, else a model is trained once')
    a('--shard', help='K/N: run only the K-th (from 0) of N fixed slices of the cells (job arrays)')
    a('--workers', type=int, help='worker processes on this machine (one GPU each when there are several)')
    a('--epochs', type=int, help="backdoor training epochs (default: train_badnet.py's)")
    a('--checkpoint_root', help='the zoo is <checkpoint_root>/zoo/; models made here go to <checkpoint_root>/table/')
    a('--ratio', type=float, help='clean fraction given to the defenses')
    a('--skip_retune', action='store_true', help="don't run the retuning attack on each cell's model")
    a('--trojan_pattern', help="the trojan row's additive pattern: the references' "
      'trigger/best_square_trigger_cifar10.npz (not shipped here)')
    a('--refool_source', help="the refool row's reflections: another data set's image folder (GTSRB's for "
      "CIFAR-10, CIFAR-10's for GTSRB), where the row's model is trained here")


def plot(a):
    a('--attacks', help='comma-separated attacks: one picture each')
    a('--seed', type=int, help="which seed's logs to draw")
    a('--robustness', action='store_true', help='draw <table_dir>/robustness.png from table.csv instead')
    a('--dataset', help='the data set whose cells to draw (default: each in table.csv, a picture each)')


def gallery(a):
    a('--image_size', type=int, help='image side in pixels (default 32)')
    a('--trigger_path', help="trojanTrigger's additive pattern (default: a demo square)")
    a('--output', help='the PNG to write')
