"""microspec: lossless speculative decoding with a small, policy-chosen draft vocabulary.

    from microspec import SpecDecoder
    from microspec.policies import InContextPolicy

    decoder = SpecDecoder(target, drafter, policy=InContextPolicy(capacity=3072), num_speculative_tokens=5)
    out = decoder.generate(input_ids, attention_mask=mask, max_new_tokens=128)
    out.sequences, out.stats
"""
from .decoder import SpecDecoder, check_vocabularies
from .outputs import GenerateOutput, SpecStats
from .policies import ClusterPolicy, FullVocab, InContextPolicy, StaticFrequencyPolicy, VocabPolicy
from .sampling import SamplingConfig
from .sparse_head import HeadSwap, SparseLMHead, sparsify_lm_head_

__version__ = "0.1.0"

__all__ = [
    "SpecDecoder", "GenerateOutput", "SpecStats", "SamplingConfig", "check_vocabularies",
    "SparseLMHead", "HeadSwap", "sparsify_lm_head_",
    "VocabPolicy", "FullVocab", "StaticFrequencyPolicy", "InContextPolicy", "ClusterPolicy",
]
