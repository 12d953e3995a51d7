"""The checkpoint layer: the on-disk format of a run folder and its checkpoints (layout and
format version), the atomic writer, verification, and loading a trained model. Training,
evaluation, export and observation all read checkpoints through here; this package imports
only the model, the tokenizer loader and the file helpers."""

from helox.checkpoint.format import FORMAT_VERSION, read_format
from helox.checkpoint.layout import (CHECKPOINTS_DIR, CONFIG_FILE, EMA_WEIGHTS, MODEL_WEIGHTS,
                                     RUN_INFO_FILE, TOKENIZER_FILE, checkpoint_dir,
                                     checkpoint_root, list_checkpoints, read_config_raw,
                                     read_run_info, run_dir_of, step_name, step_of)
from helox.checkpoint.reader import (PartialRestore, Restored, best_checkpoint, has_part,
                                     load_newest_valid, load_optimizer, load_optimizer_partial,
                                     load_part, load_weights, load_weights_partial,
                                     newest_valid, newest_valid_checkpoint, read_checkpoint,
                                     remove_stale_temporaries, resolve_checkpoint, saved_weights,
                                     verify_checkpoint)
from helox.checkpoint.trained import TrainedModel, load_trained_model
from helox.checkpoint.writer import (CheckpointWriter, JobCheckpointWriter, Snapshot, host_weights,
                                     save_checkpoint, snapshot, write_folder, write_snapshot)

__all__ = [
    "FORMAT_VERSION", "read_format",
    "CHECKPOINTS_DIR", "CONFIG_FILE", "EMA_WEIGHTS", "MODEL_WEIGHTS", "RUN_INFO_FILE",
    "TOKENIZER_FILE", "checkpoint_dir", "checkpoint_root", "list_checkpoints",
    "read_config_raw", "read_run_info", "run_dir_of", "step_name", "step_of",
    "PartialRestore", "Restored", "best_checkpoint", "has_part", "load_newest_valid",
    "load_optimizer", "load_optimizer_partial", "load_part", "load_weights",
    "load_weights_partial", "newest_valid", "newest_valid_checkpoint", "read_checkpoint",
    "remove_stale_temporaries", "resolve_checkpoint", "saved_weights", "verify_checkpoint",
    "TrainedModel", "load_trained_model",
    "CheckpointWriter", "JobCheckpointWriter", "Snapshot", "host_weights", "save_checkpoint",
    "snapshot", "write_folder",
    "write_snapshot",
]
