"""datarax_ckpt: asynchronous, exact checkpoints for JAX, built on Orbax's CheckpointManager."""

from datarax_ckpt import serialization as serialization
from datarax_ckpt._errors import BackgroundSaveError as BackgroundSaveError
from datarax_ckpt._errors import CheckpointCorruptedError as CheckpointCorruptedError
from datarax_ckpt._errors import CheckpointError as CheckpointError
from datarax_ckpt._errors import CheckpointExistsError as CheckpointExistsError
from datarax_ckpt._errors import CheckpointFormatError as CheckpointFormatError
from datarax_ckpt._errors import CheckpointNotADirectoryError as CheckpointNotADirectoryError
from datarax_ckpt._errors import CheckpointNotFoundError as CheckpointNotFoundError
from datarax_ckpt._errors import CheckpointPathError as CheckpointPathError
from datarax_ckpt._errors import DeviceMemoryError as DeviceMemoryError
from datarax_ckpt._errors import IncrementalUnsupportedError as IncrementalUnsupportedError
from datarax_ckpt._errors import NestingTooDeepError as NestingTooDeepError
from datarax_ckpt._errors import ProcessMismatchError as ProcessMismatchError
from datarax_ckpt._errors import StepOrderError as StepOrderError
from datarax_ckpt._errors import StructureMismatchError as StructureMismatchError
from datarax_ckpt._errors import WriterConflictError as WriterConflictError
from datarax_ckpt._handler import OrbaxCheckpointHandler as OrbaxCheckpointHandler
from datarax_ckpt._interop import export_orbax as export_orbax
from datarax_ckpt._interop import import_orbax as import_orbax
from datarax_ckpt._report import Problem as Problem
from datarax_ckpt._report import VerifyReport as VerifyReport
from datarax_ckpt._typing import Checkpointable as Checkpointable
from datarax_ckpt._typing import PathLike as PathLike
from datarax_ckpt._typing import PyTree as PyTree
from datarax_ckpt.options import CheckpointOptions as CheckpointOptions
from datarax_ckpt.preemption import PreemptionGuard as PreemptionGuard

__version__ = "0.1.0"

__all__ = [
    "BackgroundSaveError",
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointFormatError",
    "CheckpointNotADirectoryError",
    "CheckpointNotFoundError",
    "CheckpointOptions",
    "CheckpointPathError",
    "Checkpointable",
    "DeviceMemoryError",
    "IncrementalUnsupportedError",
    "NestingTooDeepError",
    "OrbaxCheckpointHandler",
    "PathLike",
    "PreemptionGuard",
    "Problem",
    "ProcessMismatchError",
    "PyTree",
    "StepOrderError",
    "StructureMismatchError",
    "VerifyReport",
    "WriterConflictError",
    "export_orbax",
    "import_orbax",
    "serialization",
]
