"""encode_conditions + predict and sampling against StableDiffusion3Pipeline (with and without T5)."""

from __future__ import annotations

import shutil

import pytest
import torch
from _sd3_tiny import LATENT_CHANNELS, T5_DIM, write_pipeline

import diffcore
from diffcore.errors import UserError
from diffcore.sampling import generate
from diffcore.testing import assert_outputs_close

CAPTIONS = ["a cat", "a dog and a cat"]
MAX_LEN = 12


@pytest.fixture(scope="module", params=[True, False], ids=["t5", "no-t5"])
def pipeline(request, tmp_path_factory):
    with_t5 = request.param
    root = tmp_path_factory.mktemp("sd35")
    parts = write_pipeline(root, "sd35-medium", t5=with_t5)
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    reference = StableDiffusion3Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, **parts)
    model = diffcore.load_model("sd35", variant="medium", pretrained=root, max_sequence_length=MAX_LEN, t5=with_t5)
    return with_t5, reference, model


def test_conditioning_and_prediction_match_diffusers(pipeline):
    with_t5, reference, model = pipeline
    latents = torch.randn(2, LATENT_CHANNELS, 6, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        cond = model.encode_conditions({"captions": CAPTIONS})
        ours = model.predict(latents, t, cond)
        context, _, pooled, _ = reference.encode_prompt(
            CAPTIONS, None, None, device="cpu", do_classifier_free_guidance=False, max_sequence_length=MAX_LEN
        )
        expected = reference.transformer(
            hidden_states=latents, timestep=t * 1000, encoder_hidden_states=context, pooled_projections=pooled
        ).sample
    assert cond["context"].shape == context.shape == (2, 77 + MAX_LEN, T5_DIM)
    assert torch.allclose(cond["context"], context, atol=1e-5)
    assert torch.allclose(cond["pooled"], pooled, atol=1e-5)
    if not with_t5:  # T5's part of the sequence is zeros
        assert not cond["context"][:, 77:].any()
    assert_outputs_close(ours, expected, atol=1e-4)


@pytest.mark.parametrize("skip", [False, True], ids=["cfg", "skip-layer-guidance"])
def test_sampling_matches_the_pipeline_loop(pipeline, skip):
    """diffcore's flow Euler with CFG (and skip-layer guidance) walks the pipeline's scheduler loop."""
    _, reference, model = pipeline
    scheduler = diffcore.load_scheduler(**model.default_scheduler)
    steps, seed, side = 5, 7, 8
    options = {"skip_layers": [1], "skip_layer_start": 0.0, "skip_layer_stop": 0.6} if skip else {}
    ours = generate(
        model, scheduler, batch={"captions": CAPTIONS[:1]}, height=side, width=side, steps=steps,
        guidance=4.5, seed=seed, sampler="euler", sampler_options=options, return_latents=True,
    )  # fmt: skip
    noise = torch.randn((1, LATENT_CHANNELS, side, side), generator=torch.Generator("cpu").manual_seed(seed))
    slg = {"skip_guidance_layers": [1], "skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 0.6}
    theirs = reference(
        CAPTIONS[:1], height=side * 8, width=side * 8, num_inference_steps=steps, guidance_scale=4.5,
        latents=noise, output_type="latent", max_sequence_length=MAX_LEN, **(slg if skip else {}),
    ).images  # fmt: skip
    assert_outputs_close(ours, theirs, atol=1e-4)
    if skip:  # the skipped-layer term changed the sample at all
        plain = generate(
            model, scheduler, batch={"captions": CAPTIONS[:1]}, height=side, width=side, steps=steps,
            guidance=4.5, seed=seed, return_latents=True,
        )  # fmt: skip
        assert (plain - ours).abs().max() > 1e-3


def test_frozen_parts_and_names(pipeline):
    with_t5, _, model = pipeline
    assert set(model.frozen) == ({"te1", "te2", "te3"} if with_t5 else {"te1", "te2"})
    assert type(model.frozen["te1"]).__name__ == "CLIPTextModelWithProjection"
    assert model.layer_skipping


def test_frozen_parts_load_in_bfloat16(tmp_path):
    write_pipeline(tmp_path, "sd35-medium")
    model = diffcore.load_model(
        "sd35", variant="medium", pretrained=tmp_path, frozen_dtype="bfloat16", max_sequence_length=MAX_LEN
    )
    assert model.dtype == torch.float32
    assert {next(m.parameters()).dtype for m in model.frozen.values()} == {torch.bfloat16}
    with torch.no_grad():
        cond = model.encode_conditions({"captions": CAPTIONS})
        out = model.predict(torch.randn(2, LATENT_CHANNELS, 4, 4), torch.tensor([0.5, 0.5]), cond)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def _single_file(tmp_path, parts, model, *, clips: bool, t5: bool):
    """An original-layout single file as Stability and ComfyUI ship them."""
    tensors = dict(model.export_state_dict("original"))
    if clips:
        for name, key in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
            for k, v in parts[key].state_dict().items():
                if not k.endswith("position_ids"):
                    k = k if k.startswith(("text_model.", "text_projection")) else "text_model." + k
                    tensors[f"text_encoders.{name}.transformer.{k}"] = v
    if t5:
        for k, v in parts["text_encoder_3"].state_dict().items():
            tensors[f"text_encoders.t5xxl.transformer.{k}"] = v.clone()
    file = tmp_path / "sd3.5_medium.safetensors"
    diffcore.weights.save_safetensors(tensors, file)
    return file


def test_single_file_with_its_text_encoders_matches_the_folder(tmp_path):
    """An all-in-one file: transformer, the three encoders and the VAE (first_stage_model.*)."""
    pytest.importorskip("diffcore_vae")
    from safetensors.torch import load_file

    parts = write_pipeline(tmp_path / "pipe", "sd35-medium", vae=True)
    folder = diffcore.load_model("sd35", variant="medium", pretrained=tmp_path / "pipe", max_sequence_length=MAX_LEN)
    file = _single_file(tmp_path, parts, folder, clips=True, t5=True)
    vae_file = folder.autoencoder.save(tmp_path / "vae.safetensors", layout="original")
    tensors = load_file(str(file))
    tensors.update({"first_stage_model." + k.removeprefix("first_stage_model."): v for k, v in load_file(str(vae_file)).items()})
    diffcore.weights.save_safetensors(tensors, file)
    tokenizers = {f"tokenizer{s}": str(tmp_path / "pipe" / f"tokenizer{s}") for s in ("", "_2", "_3")}
    single = diffcore.load_model(  # a file has no VAE config: the tiny VAE's group count is given
        "sd35", variant="medium", pretrained=file, max_sequence_length=MAX_LEN, vae_options={"norm_num_groups": 4},
        **tokenizers,
    )
    with torch.no_grad():
        a = folder.encode_conditions({"captions": CAPTIONS})
        b = single.encode_conditions({"captions": CAPTIONS})
    assert torch.allclose(a["context"], b["context"], atol=1e-5)
    assert torch.allclose(a["pooled"], b["pooled"], atol=1e-5)
    pixels = torch.rand(1, 3, 16, 16) * 2 - 1
    assert single.autoencoder is not None
    assert torch.allclose(single.encode_images(pixels), folder.encode_images(pixels), atol=1e-5)


def test_bad_inputs_are_user_errors(tmp_path):
    parts = write_pipeline(tmp_path / "pipe", "sd35-medium")
    model = diffcore.load_model("sd35", variant="medium", pretrained=tmp_path / "pipe", max_sequence_length=MAX_LEN)
    bare = _single_file(tmp_path, parts, model, clips=False, t5=False)
    before = bare.stat().st_mtime_ns
    with pytest.raises(UserError, match="single file holds no text encoders") as info:
        diffcore.load_model("sd35", variant="medium", pretrained=bare)
    assert info.value.where == "$.model.text_encoder" and "text_encoder_2" in str(info.value.hint)
    assert bare.stat().st_mtime_ns == before  # nothing was written

    # a T5 of the wrong width (T5-base-like for a 136-wide transformer)
    from transformers import T5Config, T5EncoderModel

    narrow = T5EncoderModel(T5Config(vocab_size=70, d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=1))
    narrow.save_pretrained(tmp_path / "t5-narrow")
    with pytest.raises(UserError, match="T5 encoder is 32 wide.*136") as info:
        diffcore.load_model(
            "sd35", variant="medium", pretrained=tmp_path / "pipe", text_encoder_3=str(tmp_path / "t5-narrow")
        )
    assert info.value.where == "$.model.text_encoder_3"

    shutil.rmtree(tmp_path / "pipe" / "text_encoder_3")
    with pytest.raises(UserError, match="no T5") as info:
        diffcore.load_model("sd35", variant="medium", pretrained=tmp_path / "pipe")
    assert "t5: false" in str(info.value.hint)


def test_bad_inputs_exit_2_through_the_cli_and_write_nothing(tmp_path):
    """diffcore run: one line naming the option, exit 2, and an existing output folder untouched."""
    import yaml
    from _sd3_tiny import reference_transformer

    from diffcore.testing import run_cli

    parts = write_pipeline(tmp_path / "pipe", "sd35-large")
    model = diffcore.load_model("sd35", pretrained=tmp_path / "pipe", max_sequence_length=MAX_LEN)
    bare = _single_file(tmp_path, parts, model, clips=False, t5=False)
    reference_transformer("sd35-medium").save_pretrained(tmp_path / "medium")
    from transformers import T5Config, T5EncoderModel

    T5EncoderModel(T5Config(vocab_size=70, d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=1)).save_pretrained(
        tmp_path / "t5-narrow"
    )
    out = tmp_path / "out"
    (out / "checkpoints" / "step-5").mkdir(parents=True)
    (out / "checkpoints" / "step-5" / "marker").write_text("kept")
    (tmp_path / "data").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "data" / "0.png")
    (tmp_path / "data" / "0.txt").write_text("a red square")
    cases = [
        ({"pretrained": str(bare)}, "$.model.text_encoder"),
        ({"pretrained": str(tmp_path / "pipe"), "text_encoder_3": str(tmp_path / "t5-narrow")}, "$.model.text_encoder_3"),
        ({"pretrained": str(tmp_path / "medium"), "variant": "large"}, "$.model.variant"),
    ]  # fmt: skip
    for model_section, where in cases:
        job = {
            "output_dir": str(out),
            "model": {"type": "sd35", **model_section},
            "data": {"type": "folder", "path": str(tmp_path / "data"), "resolution": 32, "buckets": False},
            "train": {"steps": 1},
        }
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
        done = run_cli("run", str(tmp_path / "job.yaml"))
        assert done.returncode == 2, done.stderr[-2000:]
        assert where in done.stderr and "Traceback" not in done.stderr
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "checkpoints", "checkpoints/step-5", "checkpoints/step-5/marker",
    ]  # fmt: skip


def test_sd35_resolution_dependent_shift_matches_diffusers():
    """The section the examples give for SD3.5's dynamic shift walks diffusers' sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    ours = diffcore.load_scheduler(
        "flow", shift=1.0, dynamic_shift="flux1", max_shift=1.16, sigma_spacing="sd3"
    )
    reference = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.16,
        base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip
    for seq_len in (256, 1024, 4096):
        mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.16)
        reference.set_timesteps(28, mu=mu)
        schedule = ours.sampling_schedule(28, "euler", seq_len=seq_len)
        assert torch.allclose(schedule.sigmas.float(), reference.sigmas.float(), atol=1e-5)
