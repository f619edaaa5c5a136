"""feedback_db: the one door to alignloop's SQLite database (feedback, model registry, exports)."""

from .analytics import WinRate, feedback_over_time, thumbs_by_version, wilson_interval, win_rate
from .analytics import head_to_head_votes
from .connection import StoreConfig, default_db_path
from .errors import (
    AccessDeniedError,
    FeedbackError,
    InvalidInputError,
    NotFoundError,
    RegistryError,
    SchemaVersionError,
    StoreBusyError,
    for_operator,
)
from .exports import (
    DROP_REASONS,
    Export,
    PreferenceGroup,
    export,
    export_ppo_prompts,
    export_preference_groups,
    export_preferences,
    export_sft,
    export_thumbs,
    write_jsonl,
)
from .imports import ImportResult, import_jsonl, import_rows, read_jsonl
from .promotion import auto_promote_candidate
from .promotion import promotion_candidate, promotion_evidence
from .leaderboard import LeaderboardRow, leaderboard
from .registry import ModelRegistry, ModelVersion, TrainingRound
from .sequential_testing import PromotionEvidence, PromotionPolicy, Vote, mixture_likelihood_ratio
from .store import CHOICES, UNVOTABLE_FINISH_REASONS, Context, FeedbackStore, Reply

__all__ = [
    "auto_promote_candidate",
    "promotion_candidate", "promotion_evidence", "PromotionEvidence", "PromotionPolicy", "Vote",
    "mixture_likelihood_ratio", "head_to_head_votes",
    "LeaderboardRow", "leaderboard", "WinRate", "feedback_over_time", "thumbs_by_version", "wilson_interval", "win_rate",
    "AccessDeniedError", "CHOICES", "Context", "DROP_REASONS", "Export", "FeedbackError", "FeedbackStore",
    "ImportResult", "UNVOTABLE_FINISH_REASONS",
    "InvalidInputError", "ModelRegistry", "ModelVersion", "NotFoundError", "PreferenceGroup", "RegistryError",
    "Reply", "SchemaVersionError", "StoreBusyError", "StoreConfig", "for_operator", "TrainingRound", "export", "export_ppo_prompts",
    "export_preference_groups", "export_preferences", "export_sft", "export_thumbs", "import_jsonl", "import_rows",
    "read_jsonl", "write_jsonl", "default_db_path",
]
