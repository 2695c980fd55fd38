"""LoRA, DoRA, LoKr and LoHa adapters for diffcore.

Public API (imports torch on first use):
  ``diffcore_lora.adapter.NetworkAdapter``  what the "lora"/"dora"/"lokr"/"loha" factories return
  ``diffcore_lora.stack.apply_adapters(model, [(path, strength), ...])``  stack saved adapter files
      on a model for sampling (also ``NetworkAdapter.apply_adapters``)
"""

from __future__ import annotations

__version__ = "0.1.0"
