"""Vocabulary policies: which rows of the drafter's LM head are scored for the next draft block."""
from .adaptive_core import AdaptiveCorePolicy, adaptive_recipe
from .base import VocabPolicy
from .cluster import ClusterPolicy
from .full import FullVocab
from .in_context import InContextPolicy
from .static_frequency import StaticFrequencyPolicy
from .token_maps import load_token_map, ranked_ids_from_counts, save_token_map
from .union import UnionPolicy

__all__ = [
    "VocabPolicy", "FullVocab", "StaticFrequencyPolicy", "InContextPolicy", "ClusterPolicy",
    "UnionPolicy", "AdaptiveCorePolicy", "adaptive_recipe",
    "load_token_map", "save_token_map", "ranked_ids_from_counts",
]
