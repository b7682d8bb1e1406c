"""Resume under torch.load(weights_only=True): real Runner round trips and refused files."""
import hashlib
import io
import json
import os
import os.path as osp
import pickle
import pickletools
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer

from projects.vim_disc.engine import checkpoint as ckpt_mod
from projects.vim_disc.engine.checkpoint import (CorruptCheckpointError, UnsafeCheckpointError,
                                                 capture_rng_state, install_safe_checkpoint_loading,
                                                 load_checkpoint_safely, resolve_resume_checkpoint,
                                                 restore_rng_state, verify_checkpoint)
from tests.engine.toy_runner import toy_runner, weights

install_safe_checkpoint_loading()


def _globals_in_pickle(data: bytes) -> set:
    found = set()
    ops = list(pickletools.genops(data))
    for i, (op, arg, _) in enumerate(ops):
        if op.name == 'GLOBAL':
            found.add(arg.replace(' ', '.'))
        elif op.name == 'STACK_GLOBAL':
            found.add(f'{ops[i - 2][1]}.{ops[i - 1][1]}')
    return found


def _snapshot(directory) -> dict:
    """Every path under ``directory`` with its size, mtime and content hash."""
    snap = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            p = osp.join(root, name)
            st = os.stat(p)
            digest = None
            if osp.isfile(p):
                with open(p, 'rb') as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
            snap[osp.relpath(p, directory)] = (st.st_size, st.st_mtime_ns, digest)
    return snap


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A 6-iteration run checkpointed at 3 and 6 (shared, read-only)."""
    work_dir = tmp_path_factory.mktemp('trained')
    runner = toy_runner(work_dir, max_iters=6, ckpt_interval=3, dropout=0.0)
    runner.train()
    return work_dir


# run in a fresh interpreter: in this one the install already happened at import
_INSTALL_THREE_TIMES = r"""
import json, sys, torch
import mmengine.runner as runner_pkg, mmengine.runner.checkpoint as checkpoint_module
import mmengine.runner.runner as runner_module
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader
from projects.vim_disc.engine import checkpoint as ckpt

def name(f):
    return f[1] if isinstance(f, tuple) else f'{f.__module__}.{f.__qualname__}'

def state():
    return dict(safe_globals=sorted(map(name, torch.serialization.get_safe_globals())),
                hooks=[name(HistoryBuffer.__getstate__), name(HistoryBuffer.__setstate__),
                       name(CheckpointLoader._schemes[''])],
                save=[name(m.save_checkpoint) for m in (checkpoint_module, runner_module, runner_pkg)])

states = [state()]
for _ in range(3):
    ckpt.install_safe_checkpoint_loading()
    states.append(state())
buf = HistoryBuffer()
for v in (1.0, 4.0, 2.5):
    buf.update(v)
torch.save(dict(meta=dict(iter=1, epoch=0), state_dict={}, message_hub=dict(loss=buf)), sys.argv[1])
loaded = torch.load(sys.argv[1], weights_only=True)['message_hub']['loss']  # no allow-list context here
print('STATES ' + json.dumps(dict(states=states, allow_list=sorted(map(name, ckpt.safe_globals())),
                                  mean=loaded.mean(), max=loaded.max())))
"""


def test_install_is_idempotent(tmp_path):
    root = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
    proc = subprocess.run([sys.executable, '-c', _INSTALL_THREE_TIMES, str(tmp_path / 'hub.pth')], cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith('STATES '))[7:])
    fresh, first, *again = result['states']
    # the first install changes everything it owns: torch's allow-list, HistoryBuffer, mmengine's loader & save
    allow_list = set(result['allow_list'])
    assert 'mmengine.logging.history_buffer.HistoryBuffer' in allow_list
    assert not allow_list & set(fresh['safe_globals'])  # torch registers some of its own: none of ours yet
    assert first['safe_globals'] == sorted(allow_list | set(fresh['safe_globals']))
    assert [a != b for a, b in zip(fresh['hooks'], first['hooks'])] == [True] * 3
    assert first['save'] == ['projects.vim_disc.engine.checkpoint.save_checkpoint_atomically'] * 3
    # later installs change nothing: no second entry, no wrapper around a wrapper, one log line
    assert again == [first, first]
    assert out.count('vim-disc: checkpoints load with weights_only=True') == 1
    # and what it is for still works: the message hub's buffer loads with weights_only=True, statistics included
    assert (result['mean'], result['max']) == (pytest.approx(2.5), 4.0)


def test_history_buffer_pickles_data_only():
    buf = HistoryBuffer()
    for v in (1.0, 4.0, 2.5):
        buf.update(v)
    data = pickle.dumps(buf, protocol=2)  # torch.save's protocol
    names = _globals_in_pickle(data)
    assert 'builtins.getattr' not in names and '__builtin__.getattr' not in names
    assert not any('HistoryBuffer.' in n for n in names), names  # no methods, only the class
    restored = pickle.loads(data)
    assert restored.mean() == pytest.approx(2.5) and restored.max() == 4.0 and restored.current() == 2.5
    assert restored.statistics('min') == 1.0
    assert 'statistics_methods' not in restored.__dict__


def test_saved_checkpoint_needs_only_allow_listed_globals(trained):
    path = osp.join(trained, 'iter_6.pth')
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    # and a plain torch.load with weights_only=True (no project code involved) accepts it
    ckpt = torch.load(path, weights_only=True)
    assert ckpt['meta']['iter'] == 6
    assert isinstance(ckpt['message_hub']['log_scalars']['train/loss'], HistoryBuffer)


def test_resume_continues_at_the_right_iteration(trained, tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy_load(*args, **kwargs):
        calls.append(kwargs.get('weights_only'))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, 'load', spy_load)
    resumed_dir = tmp_path / 'resumed'
    resumed_dir.mkdir()
    for name in ('iter_3.pth', 'last_checkpoint'):
        src = osp.join(trained, name)
        with open(src, 'rb') as f:
            data = f.read()
        if name == 'last_checkpoint':
            data = str(resumed_dir / 'iter_3.pth').encode()
        (resumed_dir / name).write_bytes(data)

    cfg = Config(dict(work_dir=str(resumed_dir), resume=True, load_from=None))
    assert resolve_resume_checkpoint(cfg) == str(resumed_dir / 'iter_3.pth')
    runner = toy_runner(resumed_dir, max_iters=6, ckpt_interval=3, resume=True, load_from=cfg.load_from,
                        dropout=0.0)
    seen_iters = []
    runner.register_hook(_IterRecorder(seen_iters), priority='LOWEST')
    runner.train()
    assert calls and all(c is True for c in calls)
    assert seen_iters == [3, 4, 5]
    assert runner.iter == 6
    # the loss history of the first three iterations came back from the checkpoint's message hub
    assert len(runner.message_hub.get_scalar('train/loss').data[0]) == 6
    # same weights as the uninterrupted run: optimizer momentum, schedulers and data order all resumed
    # (no dropout here: mmengine alone does not restore the RNG; tests/engine/test_resume.py covers that)
    uninterrupted = torch.load(osp.join(trained, 'iter_6.pth'), weights_only=True)['state_dict']
    for k, v in weights(runner).items():
        torch.testing.assert_close(v, uninterrupted[k], rtol=0, atol=0)


class _IterRecorder(Hook):

    def __init__(self, seen):
        self.seen = seen

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.seen.append(runner.iter)


class _RunsShell:
    """Unpickling it would run a shell command."""

    def __reduce__(self):
        return os.system, (f'touch {self.sentinel}', )

    def __init__(self, sentinel):
        self.sentinel = sentinel


def _save(obj, path):
    with open(path, 'wb') as f:
        torch.save(obj, f)


def test_malicious_reduce_is_refused_and_not_run(tmp_path):
    sentinel = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    _save(dict(meta=dict(iter=1, epoch=0), state_dict={'w': torch.ones(2)}, payload=_RunsShell(sentinel)), path)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint_safely(str(path))
    assert 'posix.system' in err.value.offending
    assert 'posix.system' in str(err.value)
    cfg = Config(dict(work_dir=str(tmp_path), resume=True, load_from=str(path)))
    with pytest.raises(UnsafeCheckpointError):
        resolve_resume_checkpoint(cfg)
    assert not sentinel.exists()


def test_getattr_checkpoint_is_refused(tmp_path):
    """What unpatched mmengine wrote: functions stored through builtins.getattr."""

    class ViaGetattr:
        def __reduce__(self):
            return getattr, (HistoryBuffer, 'min')

    path = tmp_path / 'old.pth'
    _save(dict(meta=dict(iter=1, epoch=0), state_dict={}, m=ViaGetattr()), path)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint_safely(str(path))
    assert 'builtins.getattr' in err.value.offending


def test_object_arrays_are_refused(tmp_path):
    path = tmp_path / 'obj.pth'
    _save(dict(meta=dict(iter=1, epoch=0), state_dict={}, a=np.array([1, 'x', None], dtype=object)), path)
    with pytest.raises(UnsafeCheckpointError):
        load_checkpoint_safely(str(path))


def test_numeric_numpy_values_load(tmp_path):
    path = tmp_path / 'np.pth'
    value = dict(a=np.arange(5, dtype=np.int16), s=np.float32(2.5), names=np.array(['ab', 'c']))
    _save(value, path)
    out = load_checkpoint_safely(str(path))
    np.testing.assert_array_equal(out['a'], value['a'])
    assert out['s'] == np.float32(2.5) and out['names'].tolist() == ['ab', 'c']


def _flip_a_weight_byte(data: bytearray) -> bytearray:
    """Flip one byte inside the largest tensor storage: the archive stays readable, only its CRC shows it."""
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
        member = max((i for i in archive.infolist() if '/data/' in i.filename), key=lambda i: i.file_size)
        payload = archive.read(member)
    offset = bytes(data).index(payload) + len(payload) // 2
    data[offset] ^= 0xFF
    return data


@pytest.mark.parametrize('damage', ['truncate', 'flip_byte', 'empty'])
def test_damaged_checkpoint_refused_without_touching_work_dir(trained, tmp_path, damage):
    work_dir = tmp_path / 'wd'
    work_dir.mkdir()
    with open(osp.join(trained, 'iter_6.pth'), 'rb') as f:
        data = bytearray(f.read())
    if damage == 'truncate':
        data = data[:len(data) // 2]
    elif damage == 'flip_byte':
        data = _flip_a_weight_byte(data)
    else:
        data = bytearray()
    (work_dir / 'iter_6.pth').write_bytes(bytes(data))
    (work_dir / 'last_checkpoint').write_text(str(work_dir / 'iter_6.pth'))
    before = _snapshot(work_dir)

    cfg = Config(dict(work_dir=str(work_dir), resume=True, load_from=None))
    with pytest.raises(CorruptCheckpointError) as err:
        resolve_resume_checkpoint(cfg)
    assert 'iter_6.pth' in str(err.value)
    assert _snapshot(work_dir) == before
    assert cfg.load_from is None


def test_flipped_byte_is_detected_by_crc(trained, tmp_path):
    """The flip in the test above must be invisible to a plain load, or the CRC check proves nothing."""
    with open(osp.join(trained, 'iter_6.pth'), 'rb') as f:
        data = bytearray(f.read())
    data = _flip_a_weight_byte(data)
    path = tmp_path / 'flipped.pth'
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)  # torch itself reads the damaged weights without complaint
    with pytest.raises(CorruptCheckpointError, match='CRC'):
        verify_checkpoint(str(path))


def test_truncated_checkpoint_refused_by_runner_resume(trained, tmp_path):
    with open(osp.join(trained, 'iter_6.pth'), 'rb') as f:
        data = f.read()
    path = tmp_path / 'iter_6.pth'
    path.write_bytes(data[:-100])
    runner = toy_runner(tmp_path / 'wd', max_iters=8, resume=True, load_from=str(path))
    with pytest.raises(CorruptCheckpointError):
        runner.train()


def test_fresh_start_when_nothing_to_resume(tmp_path):
    cfg = Config(dict(work_dir=str(tmp_path), resume=True, load_from=None))
    assert resolve_resume_checkpoint(cfg) is None
    cfg = Config(dict(work_dir=str(tmp_path), resume=False, load_from=str(tmp_path / 'absent.pth')))
    assert resolve_resume_checkpoint(cfg) is None  # load_from without resume: mmengine's own business


def test_missing_resume_target_is_reported(tmp_path):
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_9.pth'))
    cfg = Config(dict(work_dir=str(tmp_path), resume=True, load_from=None))
    with pytest.raises(FileNotFoundError, match='iter_9.pth'):
        resolve_resume_checkpoint(cfg)


def test_save_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / 'iter_1.pth')
    ckpt_mod.save_checkpoint_atomically(dict(meta=dict(iter=1, epoch=0), state_dict={'w': torch.ones(3)}), path)
    good = open(path, 'rb').read()

    real_save = torch.save

    def dies_half_way(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(10)
        raise KeyboardInterrupt('killed while saving')

    monkeypatch.setattr(torch, 'save', dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt_mod.save_checkpoint_atomically(dict(meta=dict(iter=2, epoch=0), state_dict={}), path)
    assert open(path, 'rb').read() == good
    assert os.listdir(tmp_path) == ['iter_1.pth']  # no temporary file left behind


def test_runner_checkpoints_go_through_the_atomic_save(tmp_path, monkeypatch):
    written = []
    real = ckpt_mod.save_checkpoint_atomically

    def spy(checkpoint, filename, *args, **kwargs):
        written.append(osp.basename(filename))
        return real(checkpoint, filename, *args, **kwargs)

    import mmengine.runner.runner as runner_module
    assert runner_module.save_checkpoint is ckpt_mod.save_checkpoint_atomically  # what Runner calls
    monkeypatch.setattr(runner_module, 'save_checkpoint', spy)
    toy_runner(tmp_path, max_iters=2, ckpt_interval=1).train()
    assert written == ['iter_1.pth', 'iter_2.pth']


def test_rng_state_round_trips_through_a_safe_checkpoint(tmp_path):
    torch.manual_seed(3)
    np.random.seed(3)
    state = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), __import__('random').random())
    path = tmp_path / 'rng.pth'
    _save(dict(rng=state), path)
    loaded = load_checkpoint_safely(str(path))['rng']
    torch.manual_seed(99)
    np.random.seed(99)
    restore_rng_state(loaded)
    again = (torch.rand(3), np.random.rand(3), __import__('random').random())
    torch.testing.assert_close(again[0], expected[0])
    np.testing.assert_array_equal(again[1], expected[1])
    assert again[2] == expected[2]


def test_garbled_pickle_is_corrupt_not_unsafe(trained, tmp_path):
    """A damaged pickle stream (valid archive, valid CRCs) is reported as corrupt, not as an attack."""
    src = zipfile.ZipFile(osp.join(trained, 'iter_6.pth'))
    path = tmp_path / 'garbled.pth'
    with zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith('data.pkl'):
                data = data[:2] + bytes([0xF0]) * 16 + data[18:]  # 0xF0 is no pickle opcode
            out.writestr(info, data)
    with pytest.raises(CorruptCheckpointError):
        load_checkpoint_safely(str(path))
