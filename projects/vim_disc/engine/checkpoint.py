"""Checkpoints that resume under ``torch.load(weights_only=True)``, written atomically.

mmengine 0.10.7 cannot resume on torch>=2.6: ``torch.load`` now defaults to ``weights_only=True`` and
the message hub's ``HistoryBuffer`` pickles its ``statistics_methods`` (plain functions, stored through
``builtins.getattr``). Allow-listing ``getattr`` would let a checkpoint call any attribute of any
allow-listed object, so instead:

* ``HistoryBuffer`` pickles only its data (the log and count histories); the statistics methods are
  class-level code and are registered again when the buffer is rebuilt.
* A short allow-list names every other type mmengine stores: ``HistoryBuffer``, numpy arrays, scalars
  and the numeric/string dtypes (never object dtype). Everything else is refused before it runs, with an
  :class:`UnsafeCheckpointError` that names the offending global.
* A truncated or corrupt file raises :class:`CorruptCheckpointError`. :func:`resolve_resume_checkpoint`
  checks the checkpoint a run would resume from *before* the runner is built, so a refused resume leaves
  the work dir exactly as it was.
* Local checkpoints are written to a temporary file and renamed into place, so a job killed while saving
  (time limit, preemption) never leaves a half-written ``iter_N.pth`` behind for the next resume.

``install_safe_checkpoint_loading()`` installs all of this; it is idempotent. The RNG helpers at the end
carry the Python, numpy and torch random states through a checkpoint in the same safe form.
"""
import os
import os.path as osp
import pickle
import random
import re
import zipfile
from typing import List, Optional

import numpy as np
import torch
from mmengine.logging import HistoryBuffer, print_log
from mmengine.runner import checkpoint as mmengine_checkpoint
from mmengine.runner.checkpoint import CheckpointLoader, find_latest_checkpoint


class CheckpointError(RuntimeError):
    """A checkpoint that must not be resumed from."""


class UnsafeCheckpointError(CheckpointError):
    """The checkpoint references code (a pickle global) outside the allow-list."""

    def __init__(self, path: str, offending: List[str], detail: str = ''):
        self.path = path
        self.offending = offending
        names = ', '.join(offending) if offending else '(see detail)'
        msg = (f'Refusing to load checkpoint {path}: it references {names}, which is not on '
               'the allow-list of types a vim-disc checkpoint may contain '
               '(projects/vim_disc/engine/checkpoint.py). It was loaded with '
               'weights_only=True and nothing in it was executed.')
        if detail:
            msg += f'\nUnpickler said: {detail}'
        super().__init__(msg)


class CorruptCheckpointError(CheckpointError):
    """The checkpoint file is truncated or damaged."""

    def __init__(self, path: str, detail: str):
        self.path = path
        super().__init__(f'Checkpoint {path} is truncated or corrupt ({detail}). '
                         'Resume from an earlier checkpoint (--resume PATH) or start afresh; '
                         'nothing in the work dir was changed.')


# ---------------------------------------------------------------------------------------------------
# HistoryBuffer: pickle data only
# ---------------------------------------------------------------------------------------------------
def _history_buffer_getstate(self) -> dict:
    # mmengine's own __getstate__ also stored (and left in __dict__) the statistics methods: code,
    # which a weights_only load can only rebuild through builtins.getattr. Store the data alone.
    return {k: v for k, v in self.__dict__.items() if k != 'statistics_methods'}


def _history_buffer_setstate(self, state: dict) -> None:
    state = {k: v for k, v in state.items() if k != 'statistics_methods'}
    self._set_default_statistics()
    self.__dict__.update(state)


# ---------------------------------------------------------------------------------------------------
# The allow-list
# ---------------------------------------------------------------------------------------------------
# dtype characters whose arrays hold plain numbers or fixed-width strings; 'O' (objects) and 'V'
# (structured, may embed objects) stay out.
_NUMPY_DTYPE_CHARS = '?bBhHiIlLqQefdgFDGUSmM'


def _numpy_module_aliases(obj, public: str) -> list:
    """An object under its numpy-1 and numpy-2 module paths (checkpoints may come from either)."""
    name = obj.__name__
    return [(obj, f'numpy.core.{public}.{name}'), (obj, f'numpy._core.{public}.{name}')]


def safe_globals() -> list:
    """Everything besides torch's own defaults that an mmengine checkpoint may reference."""
    from numpy._core import multiarray  # numpy>=2 (pinned in requirements.txt)

    entries: list = [HistoryBuffer, np.ndarray, np.dtype]
    entries += _numpy_module_aliases(multiarray._reconstruct, 'multiarray')
    entries += _numpy_module_aliases(multiarray.scalar, 'multiarray')
    # BUILD on a dtype checks the dtype's own class (np.dtypes.Float64DType, ...), so allow those.
    entries += sorted({type(np.dtype(c)) for c in _NUMPY_DTYPE_CHARS}, key=lambda t: t.__name__)
    return entries


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------
_GLOBAL_IN_ERROR = re.compile(r'GLOBAL (\S+)|unrecognized function (.+?)(?: which|$)|but got (.+)$',
                              re.MULTILINE)


def _offending_from_message(message: str) -> List[str]:
    found = []
    for groups in _GLOBAL_IN_ERROR.findall(message):
        found += [g.strip() for g in groups if g]
    return found


def _unsafe_globals(path: str) -> List[str]:
    """Globals in the checkpoint's pickle that are not allowed; reads the pickle, executes nothing."""
    try:
        return torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise CorruptCheckpointError(path, f'{type(e).__name__}: {e}') from None


def _check_container(path: str) -> None:
    """Refuse a file that is not a complete torch zip archive (truncation cuts off its directory)."""
    if zipfile.is_zipfile(path):
        return
    with open(path, 'rb') as f:
        head = f.read(4)
    if head[:2] == b'PK':
        raise CorruptCheckpointError(path, 'zip archive without its central directory: truncated')
    # Anything else would be a pre-1.6 (non-zip) torch file; torch.load checks it below.


def load_checkpoint_safely(filename: str, map_location=None, *, mmap: bool = False):
    """``torch.load`` with ``weights_only=True`` that names what it refuses.

    Raises:
        FileNotFoundError: no such file.
        CorruptCheckpointError: truncated or damaged file.
        UnsafeCheckpointError: the pickle references a global outside the allow-list.
    """
    path = osp.expanduser(filename)
    if not osp.isfile(path):
        raise FileNotFoundError(f'{filename} can not be found.')
    _check_container(path)
    if _installed:
        return _load_allow_listed(path, map_location, mmap)
    # the allow-list applies here even where install_safe_checkpoint_loading() was never called; the context
    # manager restores torch's list on exit, so it must not wrap a load after the list was installed for good
    with torch.serialization.safe_globals(safe_globals()):
        return _load_allow_listed(path, map_location, mmap)


def _load_allow_listed(path: str, map_location, mmap: bool):
    if zipfile.is_zipfile(path):
        offending = _unsafe_globals(path)
        if offending:
            raise UnsafeCheckpointError(path, offending)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        message = str(e)
        offending = _offending_from_message(message)
        if offending:  # the unpickler named a global, a callable or a type it will not build
            detail = next((line.strip() for line in message.splitlines() if 'WeightsUnpickler' in line), message)
            raise UnsafeCheckpointError(path, offending, detail) from None
        raise CorruptCheckpointError(path, f'UnpicklingError: {message}') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CorruptCheckpointError(path, f'{type(e).__name__}: {e}') from None


def _load_from_local(filename, map_location):
    # Replaces mmengine's loader for plain paths (prefix ''); same signature.
    return load_checkpoint_safely(filename, map_location)


def verify_checkpoint(path: str) -> dict:
    """Check that ``path`` is a complete, allow-listed, resumable checkpoint; return its ``meta``.

    Checks every archive member's CRC (a flipped byte anywhere fails), the pickle's globals, and the
    structure a resume needs. Tensors are memory-mapped, not read, so this costs one pass over the file.
    """
    path = osp.expanduser(path)
    if not osp.isfile(path):
        raise FileNotFoundError(f'Checkpoint to resume from does not exist: {path}')
    _check_container(path)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                bad_member = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CorruptCheckpointError(path, f'{type(e).__name__}: {e}') from None
        if bad_member is not None:
            raise CorruptCheckpointError(path, f'CRC mismatch in archive member {bad_member}')
    try:  # memory-mapped: the tensors are not read, only the structure is checked
        checkpoint = load_checkpoint_safely(path, map_location='cpu', mmap=zipfile.is_zipfile(path))
    except CorruptCheckpointError as e:
        if 'mmap' not in str(e):
            raise
        checkpoint = load_checkpoint_safely(path, map_location='cpu')  # archives written before torch 2.1
    if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint:
        raise CorruptCheckpointError(path, 'no state_dict: not a training checkpoint')
    meta = checkpoint.get('meta')
    if not isinstance(meta, dict) or 'iter' not in meta or 'epoch' not in meta:
        raise CorruptCheckpointError(path, "no meta['iter'/'epoch']: cannot be resumed")
    return meta


def resolve_resume_checkpoint(cfg) -> Optional[str]:
    """Find and verify the checkpoint a run with ``cfg`` resumes from, before the Runner exists.

    Call it before ``Runner.from_cfg(cfg)``: the runner creates its log dir on construction, while a
    refused checkpoint here raises with the work dir untouched. With ``cfg.resume`` true and no
    ``cfg.load_from`` the latest checkpoint named by ``work_dir/last_checkpoint`` is used (mmengine's
    auto-resume); none there means a fresh start (returns None). The verified path is pinned into
    ``cfg.load_from`` so the runner resumes exactly the file that was checked.
    """
    if not cfg.get('resume', False):
        return None
    path = cfg.get('load_from')
    if path is None:
        last = osp.join(cfg.work_dir, 'last_checkpoint')
        if not osp.exists(last):
            return None
        path = find_latest_checkpoint(cfg.work_dir)
        if not path:
            raise CorruptCheckpointError(last, 'empty last_checkpoint file')
    verify_checkpoint(path)
    cfg.load_from = path
    return path


# ---------------------------------------------------------------------------------------------------
# Saving: write to a temporary file, then rename
# ---------------------------------------------------------------------------------------------------
_original_save_checkpoint = mmengine_checkpoint.save_checkpoint


def save_checkpoint_atomically(checkpoint, filename, file_client_args=None, backend_args=None):
    """mmengine's ``save_checkpoint`` with an atomic write for local paths.

    A reader sees either the previous file or the complete new one, never a prefix.
    """
    is_local = '://' not in str(filename) and file_client_args is None and backend_args is None
    if not is_local:
        return _original_save_checkpoint(checkpoint, filename, file_client_args, backend_args)
    directory = osp.dirname(osp.abspath(filename))
    os.makedirs(directory, exist_ok=True)
    tmp = f'{filename}.tmp-{os.getpid()}'
    try:
        with open(tmp, 'wb') as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    finally:
        if osp.exists(tmp):
            os.remove(tmp)
    _fsync_directory(directory)


def write_text_atomically(path: str, text: str) -> None:
    """Replace a small text file (e.g. ``last_checkpoint``) in one step."""
    tmp = f'{path}.tmp-{os.getpid()}'
    with open(tmp, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_directory(osp.dirname(osp.abspath(path)))


def _fsync_directory(directory: str) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------
# Installation
# ---------------------------------------------------------------------------------------------------
_installed = False


def install_safe_checkpoint_loading() -> None:
    """Make mmengine save and resume checkpoints that load with ``weights_only=True``. Idempotent.

    Installs the data-only ``HistoryBuffer`` pickling, the allow-list, the refusing local loader and the
    atomic local save. tools/train.py calls it before building the runner.
    """
    global _installed
    if _installed:
        return
    HistoryBuffer.__getstate__ = _history_buffer_getstate
    HistoryBuffer.__setstate__ = _history_buffer_setstate
    torch.serialization.add_safe_globals(safe_globals())
    CheckpointLoader.register_scheme(prefixes='', force=True)(_load_from_local)

    import mmengine.runner as mmengine_runner
    import mmengine.runner.runner as runner_module

    # Runner.save_checkpoint and CheckpointHook._publish_model look the name up in these modules.
    for module in (mmengine_checkpoint, runner_module, mmengine_runner):
        module.save_checkpoint = save_checkpoint_atomically
    _installed = True
    print_log('vim-disc: checkpoints load with weights_only=True (allow-list) and save atomically',
              logger='current')


# ---------------------------------------------------------------------------------------------------
# RNG state in allow-listed form
# ---------------------------------------------------------------------------------------------------
def capture_rng_state() -> dict:
    """Python, numpy, torch (CPU and every visible CUDA device) random states."""
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`; a CUDA state is applied only when CUDA is in use."""
    random.setstate(_as_python_rng_state(state['python']))
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'].cpu())
    cuda_states = state.get('cuda')
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states][:torch.cuda.device_count()])


def _as_python_rng_state(state):
    # pickling keeps tuples, but a state that went through a list-producing copy must be tuples again
    version, internal, gauss = state
    return version, tuple(internal), gauss
