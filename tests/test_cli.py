"""Bad input: one line on stderr, exit status 2, no traceback, no new or changed files."""
import os

import pytest
import torch

from conftest import run_script, write_folder


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


CASES = [
    ('evaluate.py', lambda d, bd, img: ['--model', d / 'missing.tar', *folder(img)], 'checkpoint not found'),
    ('evaluate.py', lambda d, bd, img: ['--model', d / 'text.tar', *folder(img)], 'not a readable checkpoint'),
    ('evaluate.py', lambda d, bd, img: ['--model', d / 'empty.tar', *folder(img)], 'checkpoint is empty'),
    ('evaluate.py', lambda d, bd, img: ['--model', d / 'adir.tar', *folder(img)], 'got a directory'),
    ('evaluate.py', lambda d, bd, img: ['--model', d / 'truncated.tar', *folder(img)], 'truncated or corrupt'),
    ('evaluate.py', lambda d, bd, img: ['--model', d / 'evil.tar', *folder(img)], 'could run code'),
    ('evaluate.py', lambda d, bd, img: ['--model', d / 'nan.tar', *folder(img)], 'NaN or inf'),
    ('evaluate.py', lambda d, bd, img: ['--model', bd, '--arch', 'WRN-16-1', *folder(img)], 'does not fit WRN-16-1'),
    ('evaluate.py', lambda d, bd, img: ['--model', bd, '--dataset', 'ImageFolder', '--data_root', d / 'corrupt'],
     'cannot decode image'),
    ('train_badnet.py', lambda d, bd, img: ['--dataset', 'MNIST'], "unknown dataset 'MNIST'"),
    ('train_badnet.py', lambda d, bd, img: ['--arch', 'VGG16', *folder(img)], "unknown model 'VGG16'"),
    ('train_badnet.py', lambda d, bd, img: ['--trigger_type', 'starTrigger', *folder(img)], "unknown trigger"),
    ('train_badnet.py', lambda d, bd, img: ['--target_label', 7, *folder(img)], 'outside [0, 4)'),
    ('train_badnet.py', lambda d, bd, img: ['--inject_portion', 1.5, *folder(img)], '--inject_portion must be in'),
    ('train_badnet.py', lambda d, bd, img: ['--trigger_type', 'trojanTrigger', *folder(img)], 'needs --trigger_path'),
    ('train_badnet.py', lambda d, bd, img: ['--dataset', 'ImageFolder', '--data_root', d / 'empty_data'],
     'is not an image folder'),
    ('train_badnet.py', lambda d, bd, img: ['--dataset', 'CIFAR10', '--data_root', d / 'empty_data'],
     'could not be downloaded'),
    ('train_badnet.py', lambda d, bd, img: ['--output', d / 'not_a_dir' / 'm.tar', *folder(img)],
     'not a writable directory'),
    ('train_badnet.py', lambda d, bd, img: ['--epochs', 'ten'], "invalid int value: 'ten'"),
    ('train_teacher.py', lambda d, bd, img: ['--s_model', bd, '--ratio', 0, *folder(img)], '--ratio must be in (0, 1]'),
    ('train_teacher.py', lambda d, bd, img: ['--s_model', bd, '--ratio', 1.5, *folder(img)], '--ratio must be in'),
    ('main-ARGD.py', lambda d, bd, img: ['--s_model', d / 'missing.tar', *folder(img)], 'checkpoint not found'),
    ('main-ARGD.py', lambda d, bd, img: ['--s_model', bd, '--t_model', d / 'evil.tar', *folder(img)], 'could run code'),
    ('main-ARGD.py', lambda d, bd, img: ['--defense', 'fp', *folder(img)], "unknown defense 'fp'"),
    ('main_mcl.py', lambda d, bd, img: ['--s_model', d / 'truncated.tar', *folder(img)], 'truncated or corrupt'),
    ('main_mcl.py', lambda d, bd, img: ['--s_model', bd, '--target_label', 9, *folder(img)], 'outside [0, 4)'),
]


@pytest.mark.parametrize('script,make_args,message', CASES, ids=[f'{c[0]}-{c[2][:24]}' for c in CASES])
def test_bad_input_fails_cleanly(script, make_args, message, bad_files, backdoored, image_folder, tmp_path):
    cwd = tmp_path / 'cwd'
    cwd.mkdir()
    watched = [str(cwd), str(bad_files), image_folder, backdoored['dir']]
    before = {w: snapshot(w) for w in watched}
    r = run_script(script, *make_args(bad_files, backdoored['path'], image_folder), cwd=cwd)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], r.stderr
    assert 'Traceback' not in r.stdout + r.stderr
    assert {w: snapshot(w) for w in watched} == before
    assert not (cwd / 'pwned-marker').exists()
