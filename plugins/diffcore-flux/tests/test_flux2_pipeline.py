"""encode_conditions + predict + the sampler against diffusers' Flux.2 pipelines (Flux2Pipeline for dev,
Flux2KleinPipeline and Flux2KleinInpaintPipeline for klein): prompt embeddings, Kontext ids, the
scheduler loop with empirical mu, and both Fill forms."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _flux2_tiny import LATENT_CHANNELS, LAYERS, MAX_LEN, SHAPE, TEXT_DIM, VAE, model_options, write_pipeline
from diffcore_flux.flux2 import edit

import diffcore
from diffcore.errors import UserError
from diffcore.sampling import generate
from diffcore.testing import assert_outputs_close

pytest.importorskip("diffcore_vae")

CAPTIONS = ["a cat", "the dog sat on a mat"]
TINY_VAE = {"latent_channels": 4}  # the diffusers folder says the rest


def _pipeline_class(dev: bool, inpaint: bool = False):
    from diffusers import Flux2KleinInpaintPipeline, Flux2KleinPipeline, Flux2Pipeline

    return Flux2Pipeline if dev else (Flux2KleinInpaintPipeline if inpaint else Flux2KleinPipeline)


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "klein"])
def case(request, tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler

    dev = request.param
    root = tmp_path_factory.mktemp("dev" if dev else "klein")
    parts = write_pipeline(root, dev, vae=True)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    reference = _pipeline_class(dev)(scheduler=scheduler, **parts)
    model = diffcore.load_model("flux2", pretrained=root, **model_options(dev, vae_options=TINY_VAE))
    return dev, parts, reference, model


def _pil(seed: int, height: int, width: int, mode: str = "RGB"):
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    arr = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(arr if channels == 3 else arr[..., 0], mode=mode)


def _tensor(image) -> torch.Tensor:
    from diffcore.data.dataset import to_tensor

    return to_tensor(np.array(image)).unsqueeze(0)


def test_prompt_embeddings_match_encode_prompt(case):
    dev, _, reference, model = case
    with torch.no_grad():
        ours = model.encode_conditions({"captions": CAPTIONS})["txt"]
        theirs, text_ids = reference.encode_prompt(
            CAPTIONS, device="cpu", max_sequence_length=MAX_LEN, text_encoder_out_layers=LAYERS
        )
    assert ours.shape == (2, MAX_LEN, TEXT_DIM)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(edit.text_ids(MAX_LEN), text_ids[0].float())
    assert type(model.frozen["te1"]).__name__ == ("MistralModel" if dev else "Qwen3Model")


def test_kontext_ids_match_the_pipelines():
    from diffusers import Flux2KleinInpaintPipeline, Flux2KleinPipeline

    latents = torch.zeros(1, LATENT_CHANNELS, 3, 5)
    refs = [torch.zeros(1, LATENT_CHANNELS, 2, 3), torch.zeros(1, LATENT_CHANNELS, 4, 2)]
    torch.testing.assert_close(edit.grid_ids(3, 5), Flux2KleinPipeline._prepare_latent_ids(latents)[0].float())
    want = Flux2KleinPipeline._prepare_image_ids(refs)[0].float()
    torch.testing.assert_close(edit.reference_ids([(2, 3), (4, 2)]), want)
    assert sorted(set(want[:, 0].tolist())) == [10.0, 20.0]
    torch.testing.assert_close(
        edit.reference_ids([(2, 3), (4, 2)]), Flux2KleinInpaintPipeline._prepare_image_ids(refs, 1)[0].float()
    )


@pytest.mark.parametrize("references", [0, 2], ids=["text", "two-references"])
def test_sampling_matches_the_pipeline_loop(case, references):
    """Start noise in, images out: prompt, references (t = 10, 20), empirical mu, Euler steps,
    guidance (dev: embedded 3.5; klein: true CFG 4.0 against the empty prompt) and decoding."""
    dev, _, reference, model = case
    height, width, steps, seed = 16, 24, 3, 7
    images = [_pil(1, 64, 64), _pil(2, 64, 80)][:references]  # the pipeline takes 64 pixels or more
    guidance = 3.5 if dev else 4.0
    scheduler = diffcore.load_scheduler(**model.default_scheduler)
    batch = {"captions": ["a red cat"]}
    if images:
        batch["reference"] = [_tensor(im) for im in images]
    with torch.no_grad():
        ours = generate(model, scheduler, batch=batch, height=height, width=width, steps=steps, guidance=guidance, seed=seed)
    noise = torch.randn((1, LATENT_CHANNELS, height // 4, width // 4), generator=torch.Generator("cpu").manual_seed(seed))
    theirs = reference(
        image=images or None, prompt="a red cat", height=height, width=width, num_inference_steps=steps,
        guidance_scale=guidance, latents=noise, output_type="pt", max_sequence_length=MAX_LEN,
        text_encoder_out_layers=LAYERS,
    ).images  # fmt: skip
    assert_outputs_close((ours + 1) / 2, theirs.clamp(0, 1), atol=1e-4)
    if images:  # the references condition the result
        plain = generate(model, scheduler, batch={"captions": ["a red cat"]}, height=height, width=width,
                         steps=steps, guidance=guidance, seed=seed)  # fmt: skip
        assert (plain - ours).abs().max() > 1e-3


def test_fill_reference_form_matches_the_klein_inpaint_pipeline(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from PIL import Image

    parts = write_pipeline(tmp_path, dev=False, vae=True)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    reference = _pipeline_class(False, inpaint=True)(scheduler=scheduler, **parts)
    model = diffcore.load_model("flux2", pretrained=tmp_path, **model_options(False, vae_options=TINY_VAE))
    assert model.fill_form == "reference"
    height, width, steps, seed = 16, 24, 3, 4
    source = _pil(5, height, width)
    extra = _pil(6, 8, 12)  # a further reference (the pipeline's image_reference)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[4:12, 8:20] = 255  # on the 4-pixel latent grid: its bilinear resize is exact
    mask_image = Image.fromarray(mask, mode="L")
    batch = {"captions": ["a red cat"], "reference": [_tensor(source), _tensor(extra)], "mask": _tensor(mask_image)}
    sched = diffcore.load_scheduler(**model.default_scheduler)
    with torch.no_grad():
        ours = generate(model, sched, batch=batch, height=height, width=width, steps=steps, guidance=4.0, seed=seed)
        latents = generate(model, sched, batch=batch, height=height, width=width, steps=steps, guidance=4.0,
                           seed=seed, return_latents=True)  # fmt: skip
    noise = torch.randn((1, LATENT_CHANNELS, height // 4, width // 4), generator=torch.Generator("cpu").manual_seed(seed))
    theirs = reference(
        image=source, mask_image=mask_image, image_reference=extra, prompt="a red cat", height=height, width=width,
        num_inference_steps=steps, strength=1.0, guidance_scale=4.0, latents=noise, output_type="pt",
        max_sequence_length=MAX_LEN, text_encoder_out_layers=LAYERS,
    ).images  # fmt: skip
    assert_outputs_close((ours + 1) / 2, theirs.clamp(0, 1), atol=1e-4)
    # outside the mask the sampled latent is the source's own
    src = model.encode_images(_tensor(source))
    keep = edit.latent_mask(_tensor(mask_image), height // 4, width // 4) == 0
    torch.testing.assert_close(latents[keep.expand_as(latents)], src[keep.expand_as(src)], atol=1e-5, rtol=0)


def test_fill_concat_form_folds_the_mask_as_flux1_fill_then_flux2_patchify(tmp_path):
    from diffusers import Flux2Pipeline

    mask = (torch.rand(2, 1, 32, 48, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    # FluxFillPipeline.prepare_mask_latents' 8x8 fold, then Flux.2's 2x2 patchify
    b, h, w = 2, 4, 6
    flux1 = mask.view(b, h, 8, w, 8).permute(0, 2, 4, 1, 3).reshape(b, 64, h, w)
    torch.testing.assert_close(edit.fold_mask(mask, 16), Flux2Pipeline._patchify_latents(flux1))

    c = LATENT_CHANNELS
    shape = {**SHAPE, "in_channels": 2 * c + 16, "out_channels": c}  # the tiny VAE's cell is 4 x 4 pixels
    model = diffcore.load_model("flux2", variant="klein-4b", shape=shape, vae_options=VAE)
    assert model.fill_form == "concat" and model.latent_channels == c
    # no text encoder: feed the conditioning by hand
    pixels = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(1)) * 2 - 1
    pmask = (torch.rand(2, 1, 16, 24, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    cond = model._fill_conditions({"txt": torch.randn(2, 5, TEXT_DIM)}, {"pixels": pixels}, [], pmask)
    want = torch.cat((model.encode_images(pixels * (1 - pmask)), edit.fold_mask(pmask, 4)), dim=1)
    torch.testing.assert_close(cond["concat"], want)
    out = model.predict(torch.randn(2, c, 4, 6), torch.tensor([0.3, 0.9]), cond)
    assert out.shape == (2, c, 4, 6) and torch.isfinite(out).all()
    with pytest.raises(UserError, match="needs a mask"):
        model.text = SimpleNamespace(encode=lambda captions: torch.zeros(len(captions), 5, TEXT_DIM))
        model.encode_conditions({"captions": ["x"], "pixels": pixels})
    with pytest.raises(UserError, match="neither plain .* nor a channel-concatenation Fill model"):
        diffcore.load_model("flux2", variant="klein-4b", shape={**SHAPE, "in_channels": 2 * c, "out_channels": c})


def test_edit_input_errors(case):
    dev, _, _, model = case
    pixels = torch.zeros(1, 3, 16, 16)
    with pytest.raises(UserError, match=r"mask is \(8, 8\) pixels but its image is \(16, 16\)"):
        model.encode_conditions({"captions": ["x"], "reference": pixels, "mask": torch.ones(1, 1, 8, 8)})
    with pytest.raises(UserError, match="Fill needs the image to edit"):
        model.encode_conditions({"captions": ["x"], "mask": torch.ones(1, 1, 16, 16)})


def test_text_encoder_of_another_width_is_a_user_error(tmp_path):
    write_pipeline(tmp_path, dev=False)
    with pytest.raises(UserError, match="gives 64 features per token .* takes 96") as info:
        diffcore.load_model("flux2", pretrained=tmp_path, **model_options(False, text_layers=[1, 2]))
    assert info.value.where == "$.model.text_encoder"


def test_training_facts(case):
    dev, _, _, model = case
    assert model.prediction_type == "flow"
    assert model.default_scheduler == {"type": "flow", "dynamic_shift": "flux2"}
    assert model.guidance_embedded == dev and model.train_guidance == 1.0
    assert model.latent_channels == LATENT_CHANNELS and model.latent_downscale == 4
    assert model.sequence_length(torch.zeros(1, LATENT_CHANNELS, 6, 8)) == 48
    assert set(model.frozen) == {"te1"}


@pytest.mark.parametrize("dev", [True, False], ids=["dev", "klein"])
def test_text_encoder_from_a_single_file(tmp_path, dev):
    """ComfyUI keeps the text encoder as one safetensors file (sizes read from the shapes) and the
    tokenizer as a folder: the prompt path gives what the diffusers folder gives."""
    from safetensors.torch import save_file

    parts = write_pipeline(tmp_path / "pipe", dev)
    state = {k: v.clone() for k, v in parts["text_encoder"].state_dict().items()}  # tied tensors apart
    save_file(state, tmp_path / "te.safetensors")
    options = model_options(dev)
    folder = diffcore.load_model("flux2", pretrained=tmp_path / "pipe", **options)
    # Mistral's file does not show its head size (Qwen3's q_norm does): the tiny one says it
    more = {"text_encoder_options": {"head_dim": 8}} if dev else {}
    single = diffcore.load_model(
        "flux2", pretrained=tmp_path / "pipe" / "transformer", text_encoder=str(tmp_path / "te.safetensors"),
        tokenizer=str(tmp_path / "pipe" / "tokenizer"), **options, **more,
    )  # fmt: skip
    with torch.no_grad():
        a = folder.encode_conditions({"captions": CAPTIONS})["txt"]
        b = single.encode_conditions({"captions": CAPTIONS})["txt"]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_cached_text_is_completed_with_the_batch_references(case):
    """With a text cache the method hands the cached conditioning to complete_conditions, which adds
    the references (and Fill inputs) encode_conditions would have added."""
    from diffcore.methods.config import DiffusionMethodConfig
    from diffcore.methods.diffusion import DiffusionMethod
    from diffcore.testing import fake_context

    _, _, _, model = case
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    batch = {"captions": CAPTIONS, "reference": [pixels, -pixels]}
    with torch.no_grad():
        full = model.encode_conditions(batch)
        cached = {"latents": model.encode_images(pixels), "cond": {"txt": full["txt"]}, "reference": batch["reference"]}
        ctx = fake_context(model, method=DiffusionMethod(DiffusionMethodConfig()))
        cond = ctx.method.noise(ctx, cached).cond
    assert len(cond["reference_latents"]) == 2
    for ours, want in zip(cond["reference_latents"], full["reference_latents"], strict=True):
        torch.testing.assert_close(ours, want)
    torch.testing.assert_close(cond["txt"], full["txt"])
