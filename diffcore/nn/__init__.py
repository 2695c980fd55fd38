"""Neural-network building blocks shared by the architecture plugins.

One copy of each piece several architectures need: sinusoidal timestep embeddings, attention over
``scaled_dot_product_attention``, adaptive-norm modulation, RMS norm and activation checkpointing.
Architecture-specific layers stay in their plugin.
"""

from diffcore.nn.attention import attention, merge_heads, split_heads
from diffcore.nn.checkpointing import checkpointed
from diffcore.nn.embeddings import TimestepMLP, timestep_embedding
from diffcore.nn.modulation import modulate
from diffcore.nn.norms import RMSNorm
from diffcore.nn.rope import apply_rope, rope_frequencies

__all__ = [
    "RMSNorm",
    "TimestepMLP",
    "apply_rope",
    "attention",
    "checkpointed",
    "merge_heads",
    "modulate",
    "rope_frequencies",
    "split_heads",
    "timestep_embedding",
]
