"""feedback_db: the one door to alignloop's SQLite database (feedback, model registry, exports)."""

from .analytics import WinRate, feedback_over_time, thumbs_by_version, wilson_interval, win_rate
from .connection import StoreConfig, default_db_path
from .errors import (
    AccessDeniedError,
    FeedbackError,
    InvalidInputError,
    NotFoundError,
    RegistryError,
    SchemaVersionError,
)
from .exports import (
    Export,
    PreferenceGroup,
    export,
    export_ppo_prompts,
    export_preference_groups,
    export_preferences,
    export_sft,
    write_jsonl,
)
from .imports import ImportResult, import_jsonl, import_rows, read_jsonl
from .promotion import auto_promote_candidate
from .registry import ModelRegistry, ModelVersion, TrainingRound
from .store import CHOICES, Context, FeedbackStore, Reply

__all__ = [
    "auto_promote_candidate",
    "WinRate", "feedback_over_time", "thumbs_by_version", "wilson_interval", "win_rate",
    "AccessDeniedError", "CHOICES", "Context", "Export", "FeedbackError", "FeedbackStore", "ImportResult",
    "InvalidInputError", "ModelRegistry", "ModelVersion", "NotFoundError", "PreferenceGroup", "RegistryError",
    "Reply", "SchemaVersionError", "StoreConfig", "TrainingRound", "export", "export_ppo_prompts",
    "export_preference_groups", "export_preferences", "export_sft", "import_jsonl", "import_rows", "read_jsonl",
    "write_jsonl", "default_db_path",
]
