"""Bad input, every entry point x every bad input: one line on stderr, exit status 2, no traceback,
no new or changed files, and a malicious pickle never runs."""
import os

from pathlib import Path

import pytest
import torch

from cli import get_arguments
from conftest import run_script, write_folder
from defenses import registry


def snapshot(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            st = os.stat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


class Evil:
    def __reduce__(self):
        return (os.system, ('touch pwned-marker',))


@pytest.fixture(scope='module')
def bad_files(tmp_path_factory, backdoored):
    d = tmp_path_factory.mktemp('bad')
    (d / 'text.tar').write_text('hello, not a checkpoint')
    (d / 'empty.tar').write_bytes(b'')
    (d / 'adir.tar').mkdir()
    good = open(backdoored['path'], 'rb').read()
    (d / 'truncated.tar').write_bytes(good[:len(good) // 2])
    torch.save({'state_dict': Evil()}, d / 'evil.tar')  # what a hostile 'checkpoint' looks like
    ckpt = torch.load(backdoored['path'], weights_only=True)
    ckpt['state_dict']['fc.weight'][0, 0] = float('nan')
    torch.save(ckpt, d / 'nan.tar')
    (d / 'not_a_dir').write_text('a file where a folder should be')
    (d / 'empty_data').mkdir()
    corrupt = write_folder(str(d / 'corrupt'), n_train=3, n_test=2)
    with open(os.path.join(corrupt, 'train', 'blue', '00004.png'), 'wb') as f:
        f.write(b'\x89PNG garbage')
    return d


def folder(image_folder):
    return ['--dataset', 'ImageFolder', '--data_root', image_folder]


# Every entry point, with the flags of a run that would otherwise start (one cheap epoch).
ENTRY_POINTS = {
    'evaluate.py': lambda bd: ['--model', bd],
    'train_badnet.py': lambda bd: ['--epochs', 1, '--compile', 'off'],
    'train_teacher.py': lambda bd: ['--s_model', bd, '--teacher_epochs', 1],
    'main-ARGD.py': lambda bd: ['--s_model', bd, '--t_model', bd, '--epochs', 1],
    'main_mcl.py': lambda bd: ['--s_model', bd, '--mcl_target', 0, '--epochs', 1],
    'main_ft.py': lambda bd: ['--s_model', bd, '--epochs', 1],
    'retune.py': lambda bd: ['--model', bd, '--epochs', 1],
    'main_strip.py': lambda bd: ['--s_model', bd, '--strip_images', 20, '--strip_n', 4],
}
# The flags through which each entry point reads a checkpoint.
CHECKPOINT_FLAGS = [('evaluate.py', '--model'), ('train_teacher.py', '--s_model'), ('main-ARGD.py', '--s_model'),
                    ('main-ARGD.py', '--t_model'), ('main_mcl.py', '--s_model'), ('main_ft.py', '--s_model'),
                    ('retune.py', '--model'), ('evaluate.py', '--attack_from'), ('retune.py', '--attack_from'),
                    ('main_strip.py', '--s_model')]
WRITERS = ('train_badnet.py', 'train_teacher.py', 'main-ARGD.py', 'main_mcl.py', 'main_ft.py')

# name -> (extra flags given d = the folder of bad files, img = a good image folder; expected message)
BAD_CHECKPOINTS = {
    'missing': (lambda d: d / 'missing.tar', 'checkpoint not found'),
    'text': (lambda d: d / 'text.tar', 'not a readable checkpoint'),
    'empty': (lambda d: d / 'empty.tar', 'checkpoint is empty'),
    'directory': (lambda d: d / 'adir.tar', 'a directory'),  # 'got a directory' or, for a teacher to write, 'is a directory'
    'truncated': (lambda d: d / 'truncated.tar', 'truncated or corrupt'),
    'malicious': (lambda d: d / 'evil.tar', 'could run code'),
    'nan': (lambda d: d / 'nan.tar', 'NaN or inf'),
}
BAD_INPUTS = {
    'arch-mismatch': (lambda d, img: ['--arch', 'WRN-16-1', *folder(img)], 'does not fit WRN-16-1'),
    'unknown-dataset': (lambda d, img: ['--dataset', 'MNIST'], "unknown dataset 'MNIST'"),
    'unknown-arch': (lambda d, img: ['--arch', 'VGG16', *folder(img)], "unknown model 'VGG16'"),
    'unknown-trigger': (lambda d, img: ['--trigger_type', 'starTrigger', *folder(img)], 'unknown trigger'),
    'target-out-of-range': (lambda d, img: ['--target_label', 7, *folder(img)], 'outside [0, 4)'),
    'ratio-zero': (lambda d, img: ['--ratio', 0, *folder(img)], '--ratio must be in (0, 1]'),
    'ratio-above-one': (lambda d, img: ['--ratio', 1.5, *folder(img)], '--ratio must be in (0, 1]'),
    'inject-portion': (lambda d, img: ['--inject_portion', 1.5, *folder(img)], '--inject_portion must be in'),
    'trojan-without-file': (lambda d, img: ['--trigger_type', 'trojanTrigger', *folder(img)], 'needs --trigger_path'),
    'not-an-image-folder': (lambda d, img: folder(d / 'empty_data'), 'is not an image folder'),
    'corrupt-image': (lambda d, img: folder(d / 'corrupt'), 'cannot decode image'),
    'cifar-absent-offline': (lambda d, img: ['--dataset', 'CIFAR10', '--data_root', d / 'empty_data'],
                             'could not be downloaded'),
    'bad-int': (lambda d, img: ['--batch_size', 'ten', *folder(img)], "invalid int value: 'ten'"),
}
BAD_OUTPUTS = {
    'output-under-a-file': (lambda d, img: ['--output', d / 'not_a_dir' / 'm.tar', *folder(img)],
                            'not a writable directory'),
    'log-root-under-a-file': (lambda d, img: ['--log_root', d / 'not_a_dir' / 'logs', *folder(img)],
                              'not a writable directory'),
}


def reads_options(script, flags):
    """Whether the script has every option in flags (one it lacks is argparse's 'unrecognized' error), with the
    defense they choose."""
    flags = [str(f) for f in flags]
    defense = flags[flags.index('--defense') + 1] if '--defense' in flags else None
    known = get_arguments(script, defense=defense if defense in registry() else None)._option_string_actions
    return all(f in known for f in flags if isinstance(f, str) and f.startswith('--'))


def matrix():
    """Every entry point x every bad input that applies to it."""
    cases = []
    for script, flag in CHECKPOINT_FLAGS:
        for name, (path, message) in BAD_CHECKPOINTS.items():
            if flag == '--t_model' and name == 'missing':  # not an error: ARGD fine-tunes the teacher it lacks
                continue
            if flag == '--attack_from' and name == 'nan':  # only its meta is read: its weights do not matter
                continue
            cases.append((f'{script}{flag}-{name}', script,
                          lambda d, bd, img, flag=flag, path=path: [flag, path(d), *folder(img)], message))
    for script in ENTRY_POINTS:
        inputs = dict(BAD_INPUTS, **(BAD_OUTPUTS if script in WRITERS else {}))
        if script == 'train_badnet.py':  # reads no checkpoint, so --arch is the model it builds
            del inputs['arch-mismatch']
        if script == 'main-ARGD.py':
            inputs['unknown-defense'] = (lambda d, img: ['--defense', 'no-such', *folder(img)], "unknown defense 'no-such'")
        if script == 'main_ft.py':
            inputs['adv-share'] = (lambda d, img: ['--adv_share', 1.5, *folder(img)], '--adv_share must be in [0, 1]')
            inputs['negative-rho'] = (lambda d, img: ['--rho', -1, *folder(img)], '--rho must be a finite number >= 0')
            inputs['no-pgd-steps'] = (lambda d, img: ['--adv_steps', 0, *folder(img)], '--adv_steps must be >= 1')
            inputs['unknown-source'] = (lambda d, img: ['--source', 'oracle', *folder(img)], "unknown source 'oracle'")
            inputs['no-nc-passes'] = (lambda d, img: ['--defense', 'nc', '--nc_epochs', 0, *folder(img)],
                                      '--nc_epochs must be >= 1')
            inputs['mcr-t-word'] = (lambda d, img: ['--defense', 'mcr', '--mcr_t', 'middle', *folder(img)],
                                    "--mcr_t must be 'auto' or a number in [0, 1]")
            inputs['mcr-teacher-text'] = (lambda d, img: ['--defense', 'mcr', '--t_model', d / 'text.tar', *folder(img)],
                                          'not a readable checkpoint')
        if script == 'main_strip.py':
            inputs['strip-frr'] = (lambda d, img: ['--strip_frr', 1.0, *folder(img)], '--strip_frr must be in (0, 1)')
            inputs['no-overlays'] = (lambda d, img: ['--strip_n', 0, *folder(img)], '--strip_n must be >= 1')
        if script == 'main_mcl.py':
            inputs['mcl-target-word'] = (lambda d, img: ['--mcl_target', 'first', *folder(img)], "--mcl_target must be")
            inputs['mcl-target-out-of-range'] = (lambda d, img: ['--mcl_target', 9, *folder(img)], '--mcl_target 9 is outside')
            inputs['no-inversion-passes'] = (lambda d, img: ['--inv_epochs', 0, *folder(img)], '--inv_epochs must be >= 1')
            inputs['no-detection-passes'] = (lambda d, img: ['--detect_epochs', 0, *folder(img)],
                                             '--detect_epochs must be >= 1')
        for name, (make, message) in inputs.items():
            if reads_options(script, make(Path('d'), 'img')):
                cases.append((f'{script}-{name}', script, lambda d, bd, img, make=make: make(d, img), message))
    return cases


CASES = matrix()


@pytest.mark.parametrize('script,make_args,message', [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.slow
def test_bad_input_fails_cleanly(script, make_args, message, bad_files, backdoored, image_folder, tmp_path):
    cwd = tmp_path / 'cwd'
    cwd.mkdir()
    watched = [str(cwd), str(bad_files), image_folder, backdoored['dir']]
    before = {w: snapshot(w) for w in watched}
    args = ENTRY_POINTS[script](backdoored['path']) + make_args(bad_files, backdoored['path'], image_folder)
    r = run_script(script, *args, cwd=cwd)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], r.stderr
    assert 'Traceback' not in r.stdout + r.stderr
    assert {w: snapshot(w) for w in watched} == before
    assert not (cwd / 'pwned-marker').exists()
    assert not os.listdir(cwd), os.listdir(cwd)  # not even an empty folder left behind


def test_an_option_a_script_does_not_read_is_refused(tmp_path):
    r = run_script('evaluate.py', '--ratio', 0.5, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == 'error: unrecognized arguments: --ratio 0.5', r.stderr
