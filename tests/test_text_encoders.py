"""diffcore.text_encoders against transformers (and diffusers' Flux.2 prompt encoders) on the same
random weights: every layout and family loads to the same outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffcore.errors import UserError
from diffcore.testing.tokenizers import clip_tokenizer, llm_tokenizer, t5_tokenizer
from diffcore.text_encoders import (
    ClipConfig,
    MistralConfig,
    OpenClipConfig,
    Qwen3Config,
    T5Config,
    canonical_clip_state,
    hf_to_openclip,
    load_model,
    load_text_encoder,
    locate_weights,
)

CAPTIONS = ["a cat", "the dog sat on a mat by the cat"]

def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # larger than the default init so every weight moves the output
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


# -- CLIP ------------------------------------------------------------------------------------------
def tiny_clip(projection: bool, act: str = "quick_gelu", seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    # CLIP towers have 64-wide heads; a single file does not say how many there are
    config = CLIPTextConfig(
        vocab_size=64, hidden_size=128, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
        max_position_embeddings=77, hidden_act=act, projection_dim=24, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return _randomize(cls(config), seed)


def _ids(captions=CAPTIONS) -> torch.Tensor:
    return clip_tokenizer()(
        captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids


def _pipeline(root: Path, te, tok, sub: str = "text_encoder", tok_sub: str = "tokenizer") -> Path:
    te.save_pretrained(root / sub, safe_serialization=True)
    tok.save_pretrained(root / tok_sub)
    return root


def test_clip_l_folder_matches_transformers(tmp_path):
    ref = tiny_clip(projection=False)
    root = _pipeline(tmp_path / "pipe", ref, clip_tokenizer())
    te = load_text_encoder("clip-l", ClipConfig(pretrained=str(root), subfolder="text_encoder"))
    out = te.encode(CAPTIONS)
    with torch.no_grad():
        want = ref(_ids())
    assert out.hidden.shape == (2, 77, 128)
    torch.testing.assert_close(out.hidden, want.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(out.pooled, want.pooler_output, rtol=0, atol=0)
    # the tokenizer was found beside the encoder and pads to the full 77 positions
    assert te.tokenizer.model_max_length == 77
    assert out.mask[0].sum() == 4  # bos, c, at, eos


def test_encode_keeps_a_graph_only_through_an_encoder_that_trains(tmp_path):
    # A text-encoder adapter trains through encode(); a frozen encoder must stay inference-only.
    root = _pipeline(tmp_path / "pipe", tiny_clip(projection=False), clip_tokenizer())
    te = load_text_encoder("clip-l", ClipConfig(pretrained=str(root), subfolder="text_encoder"))
    assert not any(p.requires_grad for p in te.model.parameters())
    assert not te.encode(CAPTIONS).hidden.requires_grad
    last = list(te.model.parameters())[-1]
    last.requires_grad_(True)
    out = te.encode(CAPTIONS)
    assert out.hidden.requires_grad and out.pooled.requires_grad
    out.hidden.sum().backward()
    assert last.grad is not None and last.grad.abs().max() > 0
    with torch.no_grad():  # the caller's no_grad still wins
        assert not te.encode(CAPTIONS).hidden.requires_grad


def test_openclip_bigg_same_from_folder_original_file_and_hf_file(tmp_path):
    ref = tiny_clip(projection=True, act="gelu", seed=1)
    clip_l = tiny_clip(projection=False, seed=2)
    with torch.no_grad():
        want = ref(_ids(), output_hidden_states=True)
    root = _pipeline(tmp_path / "pipe", ref, clip_tokenizer(), "text_encoder_2", "tokenizer_2")
    # SDXL's original single file: CLIP-L in HF names, bigG in the OpenCLIP layout
    sdxl = {f"conditioner.embedders.0.transformer.{k}": v for k, v in canonical_clip_state(clip_l).items()}
    openclip = hf_to_openclip(canonical_clip_state(ref))
    assert "transformer.resblocks.0.attn.in_proj_weight" in openclip
    sdxl.update({f"conditioner.embedders.1.model.{k}": v.contiguous() for k, v in openclip.items()})
    sdxl["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)
    sdxl["model.diffusion_model.x.weight"] = torch.zeros(2)
    save_file(sdxl, tmp_path / "sdxl.safetensors")
    save_file(canonical_clip_state(ref), tmp_path / "clip_g.safetensors")
    tokenizer = str(root / "tokenizer_2")
    configs = [
        OpenClipConfig(pretrained=str(root), subfolder="text_encoder_2"),
        OpenClipConfig(pretrained=str(tmp_path / "sdxl.safetensors"), tokenizer=tokenizer),
        OpenClipConfig(pretrained=str(tmp_path / "clip_g.safetensors"), tokenizer=tokenizer),
    ]
    for config in configs:
        out = load_text_encoder("openclip-bigg", config).encode(CAPTIONS)
        torch.testing.assert_close(out.hidden, want.hidden_states[-2], rtol=0, atol=0)  # penultimate
        torch.testing.assert_close(out.pooled, want.text_embeds, rtol=0, atol=0)
    # the CLIP-L tower of the same file is found under its own prefix
    te1 = load_model("clip-l", ClipConfig(pretrained=str(tmp_path / "sdxl.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(
            te1(_ids()).last_hidden_state, clip_l(_ids()).last_hidden_state, rtol=0, atol=0
        )


@pytest.mark.parametrize("level", ["text_model.", ""])
@pytest.mark.parametrize("stored", [torch.float32, torch.int64, None])
def test_clip_l_single_file_sizes_from_shapes_and_position_ids_repair(tmp_path, level, stored):
    ref = tiny_clip(projection=False, seed=3)
    state = {level + k.removeprefix("text_model."): v for k, v in canonical_clip_state(ref).items()}
    if stored is not None:  # old files: float ids with drift, or int64 ids that are simply wrong
        drift = torch.arange(77, dtype=torch.float32) + 0.4 if stored is torch.float32 else torch.zeros(77)
        state[level + "embeddings.position_ids"] = drift.to(stored)[None]
    state["text_projection.weight"] = torch.randn(24, 128)  # ComfyUI's clip_l carries the projection
    state["logit_scale"] = torch.tensor(4.6)
    save_file(state, tmp_path / "clip_l.safetensors")
    model = load_model("clip-l", ClipConfig(pretrained=str(tmp_path / "clip_l.safetensors")))
    assert model.config.num_hidden_layers == 3 and model.config.intermediate_size == 48
    assert model.config.hidden_act == "quick_gelu"
    position_ids = dict(model.named_buffers())[
        next(n for n, _ in model.named_buffers() if n.endswith("position_ids"))
    ]
    assert position_ids.dtype == torch.int64 and position_ids.tolist() == [list(range(77))]
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).pooler_output, ref(_ids()).pooler_output, rtol=0, atol=0)


def test_meta_loading_streams_in_the_requested_dtype(tmp_path, monkeypatch):
    ref = tiny_clip(projection=True, act="gelu", seed=4)
    root = _pipeline(tmp_path / "pipe", ref, clip_tokenizer(), "text_encoder_2", "tokenizer_2")
    model = load_model(
        "openclip-bigg", OpenClipConfig(pretrained=str(root / "text_encoder_2"), dtype="bfloat16")
    )
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    assert not any(t.is_meta for t in tensors.values())
    assert {t.dtype for t in model.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(
        model.text_projection.weight, ref.text_projection.weight.to(torch.bfloat16), rtol=0, atol=0
    )


# -- T5 --------------------------------------------------------------------------------------------
def test_t5_folder_single_file_and_sd3_prefix_agree(tmp_path):
    from transformers import T5Config as HFT5Config
    from transformers import T5EncoderModel

    config = HFT5Config(
        vocab_size=60, d_model=32, d_ff=40, d_kv=8, num_heads=4, num_layers=2, relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
    )  # fmt: skip
    ref = _randomize(T5EncoderModel(config), 5)
    tok = t5_tokenizer(words=())
    root = _pipeline(tmp_path / "pipe", ref, tok, "text_encoder_2", "tokenizer_2")
    state = {k: v for k, v in ref.state_dict().items() if k != "shared.weight"}  # only the encoder's copy
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "t5xxl.safetensors")
    sd3 = {f"text_encoders.t5xxl.transformer.{k}": v.clone() for k, v in ref.state_dict().items()}
    save_file(sd3 | {"text_encoders.clip_l.transformer.x": torch.zeros(1)}, tmp_path / "sd3.safetensors")
    ids = tok(CAPTIONS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        want = ref(ids).last_hidden_state
    tokenizer = str(root / "tokenizer_2")
    for pretrained, sub in (
        (root, "text_encoder_2"),
        (tmp_path / "t5xxl.safetensors", None),
        (tmp_path / "sd3.safetensors", None),
    ):
        te = load_text_encoder(
            "t5", T5Config(pretrained=str(pretrained), subfolder=sub, tokenizer=tokenizer, max_length=16)
        )
        out = te.encode(CAPTIONS)
        assert te.model.config.d_ff == 40 and te.model.config.num_layers == 2
        torch.testing.assert_close(out.hidden, want, rtol=0, atol=0)
        assert out.pooled is None
        # the token embedding is one tied tensor, as in the reference
        assert te.model.encoder.embed_tokens.weight is te.model.shared.weight


# -- decoder-only LLMs -----------------------------------------------------------------------------
def tiny_qwen3(seed: int = 6):
    from transformers import Qwen3Config as HFQwen3Config
    from transformers import Qwen3ForCausalLM

    config = HFQwen3Config(
        vocab_size=24, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    )  # fmt: skip
    return _randomize(Qwen3ForCausalLM(config), seed)


@pytest.mark.parametrize("layers", [(1, 2, 3), (2, 4)])
@pytest.mark.parametrize("layout", ["folder", "file"])
def test_qwen3_matches_diffusers_flux2_klein_prompt_embeds(tmp_path, layers, layout):
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline

    ref = tiny_qwen3()
    tok = llm_tokenizer(bos=False)
    root = _pipeline(tmp_path / "klein", ref, tok)
    config = Qwen3Config(pretrained=str(root), subfolder="text_encoder", layers=layers, max_length=24)
    if layout == "file":  # bare Qwen3Model keys, sizes from shapes
        state = {k.removeprefix("model."): v for k, v in ref.state_dict().items() if k.startswith("model.")}
        save_file(state, tmp_path / "qwen_3.safetensors")
        config = Qwen3Config(pretrained=str(tmp_path / "qwen_3.safetensors"), tokenizer=str(root / "tokenizer"),
                             layers=layers, max_length=24)  # fmt: skip
    te = load_text_encoder("qwen3", config)
    out = te.encode(CAPTIONS)
    want = Flux2KleinPipeline._get_qwen3_prompt_embeds(
        text_encoder=ref, tokenizer=tok, prompt=CAPTIONS, max_sequence_length=24, hidden_states_layers=layers
    )
    assert out.hidden.shape == (2, 24, 32 * len(layers))
    torch.testing.assert_close(out.hidden, want, rtol=0, atol=1e-6)
    # only the layers up to the deepest one used are built
    assert len(te.model.layers) == min(4, max(layers) + 1)
    # stacking is the chosen hidden states concatenated along features, in order
    ids, mask = te.tokenize(CAPTIONS)
    with torch.no_grad():
        states = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out.hidden, torch.cat([states[k] for k in layers], dim=-1), rtol=0, atol=1e-6)
    # the chat template got the generation prompt and thinking off
    assert tok.convert_tokens_to_ids("[nothink]") in ids[0].tolist()


def test_mistral_matches_diffusers_flux2_prompt_embeds(tmp_path):
    from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralVisionConfig
    from transformers import MistralConfig as HFMistralConfig

    text = HFMistralConfig(
        vocab_size=24, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, rope_theta=1e9, rms_norm_eps=1e-5, sliding_window=None,
    )  # fmt: skip
    vision = PixtralVisionConfig(
        hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
        image_size=32, patch_size=16,
    )  # fmt: skip
    ref = _randomize(Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision,
                                                                     image_token_index=23)), 7)  # fmt: skip
    tok = llm_tokenizer(bos=True)
    root = _pipeline(tmp_path / "flux2", ref, tok)
    layers = (1, 2, 3)
    te = load_text_encoder(
        "mistral", MistralConfig(pretrained=str(root), subfolder="text_encoder", layers=layers, max_length=40)
    )
    assert not any(n.startswith(("vision", "multi_modal")) for n, _ in te.model.named_parameters())
    out = te.encode(["a cat [IMG]", "the dog"])
    want = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
        text_encoder=ref, tokenizer=tok, prompt=["a cat [IMG]", "the dog"], max_sequence_length=40,
        hidden_states_layers=layers,
    )  # fmt: skip
    torch.testing.assert_close(out.hidden, want, rtol=0, atol=1e-6)
    # BFL's system message is in the prompt and BOS appears once (written by the template)
    ids, _ = te.tokenize(["a cat"])
    assert ids[0].tolist().count(tok.bos_token_id) == 1
    assert tok.convert_tokens_to_ids("[system]") in ids[0].tolist()


def test_llm_layers_outside_the_model_are_a_user_error(tmp_path):
    ref = tiny_qwen3()
    root = _pipeline(tmp_path / "klein", ref, llm_tokenizer(bos=False))
    with pytest.raises(UserError, match=r"hidden layers \[9, 18, 27\] do not exist in a 4-layer model"):
        load_model("qwen3", Qwen3Config(pretrained=str(root / "text_encoder")))


# -- errors ----------------------------------------------------------------------------------------
def test_missing_and_unknown_files_are_clear_user_errors(tmp_path):
    with pytest.raises(UserError, match="no such file or folder") as missing:
        load_model("clip-l", ClipConfig(pretrained=str(tmp_path / "nope.safetensors")))
    assert "nope.safetensors" in str(missing.value)
    (tmp_path / "clip.bin").write_bytes(b"\x80\x04")
    with pytest.raises(UserError, match="only .safetensors"):
        load_model("clip-l", ClipConfig(pretrained=str(tmp_path / "clip.bin")))
    save_file({"model.diffusion_model.x": torch.zeros(1)}, tmp_path / "unet.safetensors")
    with pytest.raises(UserError, match="no t5 text encoder in these weights"):
        load_model("t5", T5Config(pretrained=str(tmp_path / "unet.safetensors")))
    with pytest.raises(UserError, match="no weights given for the clip-l text encoder"):
        locate_weights("clip-l", ClipConfig())
    with pytest.raises(UserError, match="holds no text_encoder_2/ folder"):
        (tmp_path / "empty").mkdir()
        load_model("clip-l", ClipConfig(pretrained=str(tmp_path / "empty"), subfolder="text_encoder_2"))
    with pytest.raises(UserError, match="unknown text encoder family 'clip-h'"):
        load_model("clip-h", ClipConfig())


def test_no_tokenizer_found_names_the_option(tmp_path):
    root = tmp_path / "pipe"
    tiny_clip(projection=False).save_pretrained(root / "text_encoder")
    with pytest.raises(UserError, match="no tokenizer found for the clip-l text encoder"):
        load_text_encoder("clip-l", ClipConfig(pretrained=str(root), subfolder="text_encoder"))


def test_records_are_registered_and_build_encoders(tmp_path):
    import diffcore
    from diffcore.builtin.text_encoders import records

    found = {r.name: r for r in records()}
    assert {n: r.config.__name__ for n, r in found.items()} == {
        "clip-l": "ClipConfig", "openclip-bigg": "OpenClipConfig", "t5": "T5Config",
        "qwen3": "Qwen3Config", "mistral": "MistralConfig",
    }  # fmt: skip
    assert sorted(diffcore.get_registry().names("text_encoder")) == sorted(found)
    ref = tiny_clip(projection=False, seed=8)
    root = _pipeline(tmp_path / "pipe", ref, clip_tokenizer())
    te = found["clip-l"].factory(ClipConfig(pretrained=str(root)))  # the pipeline's text_encoder/
    with torch.no_grad():
        torch.testing.assert_close(te.encode(CAPTIONS).pooled, ref(_ids()).pooler_output, rtol=0, atol=0)


def test_clip_width_the_assumed_heads_do_not_split_is_a_user_error(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    # 200 wide: a single file gets 200 // 64 = 3 heads, which do not divide it
    config = CLIPTextConfig(
        vocab_size=64, hidden_size=200, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77,
    )  # fmt: skip
    save_file(CLIPTextModel(config).state_dict(), tmp_path / "clip.safetensors")
    with pytest.raises(UserError) as caught:
        load_model("clip-l", ClipConfig(pretrained=str(tmp_path / "clip.safetensors")))
    assert caught.value.where == str(tmp_path / "clip.safetensors") and "3 attention heads" in caught.value.message
    model = load_model(
        "clip-l", ClipConfig(pretrained=str(tmp_path / "clip.safetensors"), options={"num_attention_heads": 2})
    )
    assert model.config.num_attention_heads == 2
