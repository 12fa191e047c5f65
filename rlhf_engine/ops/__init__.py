"""Fused RLHF kernels (compiled extension `rlhf_engine._C`) and their plain-torch references.

Importing this package loads the extension; if it was not built, the ImportError says how.
"""

from rlhf_engine.ops.gae import gae, gae_packed
from rlhf_engine.ops.hidden_logprobs import logprobs_from_hidden
from rlhf_engine.ops.logprobs import logprobs_from_logits
from rlhf_engine.ops.masked import masked_mean, masked_var, masked_whiten
from rlhf_engine.ops.token_kl import token_kl

__all__ = [
    "gae",
    "gae_packed",
    "logprobs_from_hidden",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "token_kl",
]
