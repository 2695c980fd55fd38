"""Key names of the original single-file layouts (LDM/SGM ``first_stage_model.``, BFL ``ae``) versus
the diffusers layout that :class:`~diffcore_vae.network.KLAutoencoderNet` uses, as
:mod:`diffcore.keymap` rules.

The rules are written diffusers -> original; loading inverts them over the module's own keys, so the
two directions cannot drift apart. The decoder's levels run in the opposite order (``levels`` is
``len(block_out_channels)``). The mid-block attention projections are 1x1 convolutions in the
original files and linear layers in diffusers (older diffusers exports also hold convolutions).
"""

from __future__ import annotations

from diffcore.keymap import Drop, KeyMap, Rule, Squeeze

_ATTENTION = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(module: str, file: str) -> tuple[Rule, ...]:
    return Rule(f"{module}.conv_shortcut", f"{file}.nin_shortcut"), Rule(module, file)


ORIGINAL_RULES = (
    *(Rule(f"{side}.conv_norm_out", f"{side}.norm_out") for side in ("encoder", "decoder")),
    *_resnet("encoder.down_blocks.{i}.resnets.{j}", "encoder.down.{i}.block.{j}"),
    Rule("encoder.down_blocks.{i}.downsamplers.0.conv", "encoder.down.{i}.downsample.conv"),
    *_resnet("decoder.up_blocks.{i}.resnets.{j}", "decoder.up.{levels - 1 - i}.block.{j}"),
    Rule("decoder.up_blocks.{i}.upsamplers.0.conv", "decoder.up.{levels - 1 - i}.upsample.conv"),
    *(
        rule
        for side in ("encoder", "decoder")
        for k in (0, 1)
        for rule in _resnet(f"{side}.mid_block.resnets.{k}", f"{side}.mid.block_{k + 1}")
    ),
    *(
        Rule(f"{side}.mid_block.attentions.0.{new}", f"{side}.mid.attn_1.{old}", Squeeze())
        for side in ("encoder", "decoder")
        for new, old in _ATTENTION.items()
    ),
    *(
        Rule(f"{side}.mid_block.attentions.0.group_norm", f"{side}.mid.attn_1.norm")
        for side in ("encoder", "decoder")
    ),
    # training-loss weights and EMA copies some original VAE files carry besides the autoencoder
    Drop("loss.*"),
    Drop("model_ema.*"),
    Rule("*", "*"),
)
#: Flux.2's ae keeps the quantisation convolutions inside the encoder and decoder
FLUX2_RULES = (
    Rule("quant_conv", "encoder.quant_conv"),
    Rule("post_quant_conv", "decoder.post_quant_conv"),
)
DIFFUSERS_RULES = (
    *(
        Rule(f"{side}.mid_block.attentions.0.{new}", f"{side}.mid_block.attentions.0.{new}", Squeeze(save=False))
        for side in ("encoder", "decoder")
        for new in _ATTENTION
    ),
    Rule("*", "*"),
)


def original(levels: int, flux2: bool = False) -> KeyMap:
    """The original layout of an autoencoder with ``levels`` resolution levels."""
    rules = (*FLUX2_RULES, *ORIGINAL_RULES) if flux2 else ORIGINAL_RULES
    return KeyMap.of(rules, {"levels": levels}, name="original")


def diffusers() -> KeyMap:
    return KeyMap.of(DIFFUSERS_RULES, name="diffusers")


def to_original(key: str, levels: int, flux2: bool = False) -> str:
    """The original-layout name of diffusers key ``key``."""
    return original(levels, flux2).file_name(key) or key
