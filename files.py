"""Files written atomically (a reader never sees half of one) and checked before any work starts."""
import csv
import hashlib
import io
import os
import tempfile

import torch

from errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


def check_writable(path):
    """Fail before any work if `path` (a file to be written) cannot be created."""
    d = os.path.dirname(os.path.abspath(path))
    probe = d
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise UserError(f'cannot write {path}: {probe} is not a writable directory')
    if os.path.isdir(path):
        raise UserError(f'cannot write {path}: it is a directory')


def atomic_write_bytes(data, path):
    """Write to a temp file in the same folder, fsync, then rename: readers never see a partial file."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj, path):
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(buf.getvalue(), path)


def write_csv(rows, path):
    if not rows:
        return
    keys = list(rows[0])
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator='\n')
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(buf.getvalue().encode(), path)


def content_hash(path):
    """The first 12 hex digits of a file's SHA-1: what it is, wherever it lies."""
    with open(path, 'rb') as f:
        return hashlib.sha1(f.read()).hexdigest()[:12]
