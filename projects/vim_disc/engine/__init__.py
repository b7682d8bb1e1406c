from .checkpoint import (CheckpointError, CorruptCheckpointError, UnsafeCheckpointError,
                         install_safe_checkpoint_loading, load_checkpoint_safely, resolve_resume_checkpoint,
                         verify_checkpoint)
from .hooks import (NonFiniteRollbackHook, NonFiniteTrainingError, PreemptionHook, RNGStateHook, SSMStatsHook,
                    install_preemption_signal_handlers)
from .layer_decay import VimLayerDecayOptimizerConstructor, get_layer_id_for_vim
from .optim_wrapper import GuardedAmpOptimWrapper, GuardedOptimWrapper
from .sampler import (ResumableAspectRatioBatchSampler, ResumableInfiniteSampler, ResumableIterBasedTrainLoop,
                      ResumableRunner, SeedFromStreamPosition, StreamIndex)

__all__ = [
    'CheckpointError', 'CorruptCheckpointError', 'UnsafeCheckpointError', 'install_safe_checkpoint_loading',
    'load_checkpoint_safely', 'resolve_resume_checkpoint', 'verify_checkpoint', 'NonFiniteRollbackHook',
    'NonFiniteTrainingError', 'PreemptionHook', 'RNGStateHook', 'SSMStatsHook', 'install_preemption_signal_handlers',
    'VimLayerDecayOptimizerConstructor', 'get_layer_id_for_vim', 'GuardedOptimWrapper', 'GuardedAmpOptimWrapper',
    'ResumableInfiniteSampler', 'ResumableAspectRatioBatchSampler', 'ResumableIterBasedTrainLoop', 'ResumableRunner',
    'SeedFromStreamPosition', 'StreamIndex'
]
