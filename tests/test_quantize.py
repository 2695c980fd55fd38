"""model.quantize: the frozen base streams into int8 / fp8 / nf4 (torchao), adapters train on top.

The models are tiny DiTs (diffcore-dit) written to a diffusers folder with random weights; the one
exception is the memory test, whose ~200 MB file makes the measurement mean something.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

pytest.importorskip("torchao")
pytest.importorskip("diffcore_dit")
pytest.importorskip("diffcore_lora")

import diffcore  # noqa: E402
from diffcore.api import build_component  # noqa: E402
from diffcore.config.job import structure_job  # noqa: E402
from diffcore.errors import ConfigError, UserError  # noqa: E402
from diffcore.quantize import library  # noqa: E402
from diffcore.quantize.active import quantizing  # noqa: E402
from diffcore.quantize.tensors import dense, is_quantized  # noqa: E402
from diffcore.testing import run_cli, run_job  # noqa: E402

TINY = dict(hidden_size=64, depth=2, num_heads=2, patch_size=2, in_channels=3, input_size=8, num_classes=4)


def _write_dit(folder, dtype="float32", seed=0, **shape):
    """A DiT with every weight random (the zero-initialised modulation and final layers too)."""
    torch.manual_seed(seed)
    model = diffcore.load_model("dit", dtype=dtype, **{**TINY, **shape})
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(folder)
    return folder


def _inputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=g).to(model.dtype)
    return x, torch.tensor([10.0, 500.0]), model.encode_conditions({"labels": torch.tensor([1, 2])})


def _linears(module):
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.Linear)}


# -- the job key ----------------------------------------------------------------------------------
def test_quantize_is_a_kernel_key_of_the_model_section():
    job = {"model": {"type": "dit", **TINY, "quantize": "nf4"}, "data": {"type": "synthetic"}}
    parsed = structure_job(job)
    assert parsed.model.quantize == "nf4" and parsed.model.type == "dit"
    assert not hasattr(parsed.model.config, "quantize")  # never handed to the plugin
    assert parsed.to_dict()["model"]["quantize"] == "nf4"
    assert structure_job(parsed.to_dict()).model.quantize == "nf4"  # job.yaml reads back
    assert "quantize" not in structure_job({**job, "model": {"type": "dit"}}).to_dict()["model"]
    with pytest.raises(ConfigError) as bad:
        structure_job({**job, "model": {"type": "dit", "quantize": "int4"}})
    assert "$.model.quantize: must be one of none, int8, fp8, nf4, got 'int4'" in str(bad.value)


def test_validate_exits_2_on_an_unknown_mode(tmp_path):
    job = {"model": {"type": "dit", **TINY, "quantize": "q4"}, "data": {"type": "synthetic"}}
    (tmp_path / "job.yaml").write_text(json.dumps(job))
    result = run_cli("validate", str(tmp_path / "job.yaml"))
    assert result.returncode == 2, result.stderr
    assert "$.model.quantize" in result.stderr and "got 'q4'" in result.stderr


# -- what is quantised, and how -------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["int8", "fp8", "nf4"])
def test_blocks_stream_in_quantised_and_the_edges_stay_full_precision(tmp_path, mode):
    folder = _write_dit(tmp_path / "dit")
    reference = diffcore.load_model("dit", pretrained=str(folder))
    model = diffcore.load_model("dit", pretrained=str(folder), quantize=mode)
    assert model.repeated_blocks() == ["blocks"]
    linears = _linears(model.backbone)
    quantized = {name for name, m in linears.items() if is_quantized(m.weight)}
    # every Linear of the repeated blocks, nothing outside them
    assert quantized == {name for name in linears if name.startswith("blocks.")} and len(quantized) == 10
    assert {n for n in linears if n not in quantized} == {
        "t_embedder.linear_1", "t_embedder.linear_2", "final_layer.linear", "final_layer.adaLN_modulation.1",
    }  # fmt: skip
    # quantised weights are frozen buffers: no optimizer, DeepSpeed or checkpoint sees them
    assert not any(is_quantized(p) for p in model.backbone.parameters())
    assert not any(k in model.backbone.state_dict() for k in (f"{n}.weight" for n in quantized))
    # each is the file's weight to within its mode's step
    for name in quantized:
        w = reference.backbone.get_submodule(name).weight.detach()
        step = {"int8": 1 / 127, "fp8": 1 / 8, "nf4": 1 / 3}[mode]  # relative to the row's absmax
        error = (dense(linears[name].weight).float() - w).abs()
        assert (error <= step * w.abs().amax(dim=1, keepdim=True)).all(), name


def test_chunked_quantisation_equals_whole_and_bad_shapes_stay_full():
    weight = torch.randn(3000, 700, dtype=torch.bfloat16)
    for mode in ("int8", "fp8"):
        chunked = library.quantize_weight(mode, weight)  # 3000 x 700 > one chunk of 2**18 values
        whole = library._quantize(mode, weight)
        names, meta = chunked.__tensor_flatten__()
        assert meta == whole.__tensor_flatten__()[1]
        for name in names:
            assert torch.equal(getattr(chunked, name), getattr(whole, name)), (mode, name)
    assert not library.eligible("nf4", torch.randn(5, 7))  # not whole blocks of 64
    zero_row = torch.randn(4, 64)
    zero_row[2] = 0
    assert library.eligible("int8", zero_row) and not library.eligible("fp8", zero_row)


def test_text_encoders_quantise_and_autoencoders_do_not(tmp_path):
    from diffcore.text_encoders.clip import random_clip
    from diffcore.text_encoders.config import ClipConfig
    from diffcore.text_encoders.loading import load_model

    options = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   vocab_size=100, max_position_embeddings=16, projection_dim=32)  # fmt: skip
    tower = random_clip("clip-l", ClipConfig(options=options, projection=True))
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    sizes = dict(block_out_channels=[32, 32], layers_per_block=1)
    vae = diffcore.load_autoencoder("sd", **sizes)
    save_file({k: v.contiguous() for k, v in vae.module.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    with quantizing("int8") as plan:
        loaded = load_model("clip-l", ClipConfig(pretrained=str(tmp_path / "clip.safetensors"), options=options,
                                                 projection=True))  # fmt: skip
        vae = diffcore.load_autoencoder("sd", pretrained=str(tmp_path / "vae.safetensors"), **sizes)
    linears = _linears(loaded)
    quantized = {n for n, m in linears.items() if is_quantized(m.weight)}
    assert quantized == {n for n in linears if ".layers." in n} and len(quantized) == 12 == plan.quantized
    assert not is_quantized(loaded.text_projection.weight)
    # the autoencoder's attention Linears sit in a ModuleList too: its build pauses the hook
    assert _linears(vae.module) and not any(is_quantized(m.weight) for m in _linears(vae.module).values())
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        a, b = tower(ids).text_embeds, loaded(ids).text_embeds
    assert (a - b).abs().max() < 0.05 * a.abs().max()


# -- adapters on top --------------------------------------------------------------------------------
def _fake_int8(weight: torch.Tensor) -> torch.Tensor:
    """An independent int8 round trip: symmetric, one absmax scale per output row."""
    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return ((w / scale).round().clamp(-127, 127) * scale).to(weight.dtype)


def test_int8_lora_forward_is_within_the_quantisation_error_of_bf16(tmp_path):
    """The bound: int8 + LoRA differs from bf16 + LoRA by at most twice what an independent int8
    round trip of the same weights changes the bf16 forward by, plus 2**-7 of the output (bf16
    rounding of the two runs). Quantisation is the only difference allowed; the adapter's own
    contribution is over 5x the bound, so a quantised path that dropped it would fail."""
    folder = _write_dit(tmp_path / "dit", dtype="bfloat16")
    base = diffcore.load_model("dit", pretrained=str(folder), dtype="bfloat16")
    quant = diffcore.load_model("dit", pretrained=str(folder), dtype="bfloat16", quantize="int8")
    fake = diffcore.load_model("dit", pretrained=str(folder), dtype="bfloat16")
    with torch.no_grad():
        for name, m in _linears(fake.backbone).items():
            if name.startswith("blocks."):
                m.weight.copy_(_fake_int8(m.weight))
    x, t, cond = _inputs(base)
    with torch.no_grad():
        plain = base.predict(x, t, cond).float()
    outs = []
    for model in (base, quant, fake):
        adapter = build_component("adapter", "lora", {"rank": 4})
        torch.manual_seed(3)
        for p in adapter.attach(model):
            nn.init.normal_(p, 0, 0.4)
        with torch.no_grad():
            outs.append(model.predict(x, t, cond).float())
    ref, q, f = outs
    bound = 2 * (f - ref).abs().max() + 2**-7 * ref.abs().max()
    assert (q - ref).abs().max() <= bound
    print(f"int8 error {(q - ref).abs().max():.4f}, bound {bound:.4f}, adapter {(ref - plain).abs().max():.4f}")
    assert (ref - plain).abs().max() > 5 * bound


@pytest.mark.parametrize("kind", ["dora", "lokr"])
def test_dora_and_lokr_read_the_dequantised_base(tmp_path, kind):
    folder = _write_dit(tmp_path / "dit")
    outs = []
    for quantize in ("none", "int8"):
        model = diffcore.load_model("dit", pretrained=str(folder), quantize=quantize)
        adapter = build_component("adapter", kind, {"rank": 4})
        torch.manual_seed(3)
        for p in adapter.attach(model):
            if p.dim() > 1:
                nn.init.normal_(p, 0, 0.1)
        with torch.no_grad():
            outs.append(model.predict(*_inputs(model)))
    assert (outs[0] - outs[1]).abs().max() < 0.02 * outs[0].abs().max()


def _job(folder, out, quantize="int8", **train):
    return {
        "name": "quantized",
        "seed": 1,
        "output_dir": str(out),
        "model": {"type": "dit", "pretrained": str(folder), "num_classes": 4, "quantize": quantize},
        "adapter": {"type": "lora", "rank": 4},
        "scheduler": {"type": "ddpm"},
        "method": {"type": "diffusion"},
        "data": {"type": "synthetic", "resolution": 8, "size": 32},
        "train": {"steps": 24, "batch_size": 8, "lr": 0.01, "checkpoint_every": 12, **train},
        "callbacks": [{"type": "progress", "enabled": False}],
    }


def test_int8_lora_trains_resumes_and_its_file_loads_into_the_unquantised_model(tmp_path):
    folder = _write_dit(tmp_path / "dit")
    run = run_job(_job(folder, tmp_path / "run"), tmp_path / "run")
    losses = run.losses
    assert sum(losses[-8:]) / 8 < 0.93 * sum(losses[:8]) / 8, losses
    # the DeepSpeed checkpoint holds no quantised base
    split = tmp_path / "split"
    run_job(_job(folder, split, steps=12), split)
    assert run_job(_job(folder, split), split, resume=True).losses == losses
    # the same format as a run on the unquantised base: same tensors, shapes and header keys
    plain = run_job(_job(folder, tmp_path / "plain", quantize="none", steps=1), tmp_path / "plain")
    files = [run.output_dir / "final" / "adapter.safetensors", plain.output_dir / "final" / "adapter.safetensors"]
    shapes, metas = [], []
    for file in files:
        with safe_open(str(file), "pt") as f:
            shapes.append({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
            metas.append(set(f.metadata()))
    assert shapes[0] == shapes[1] and any(k.endswith(".alpha") for k in shapes[0]) and metas[0] == metas[1]
    # and it loads into the full-precision model, predicting what the quantised one does with it
    from diffcore_lora.adapter import NetworkAdapter

    full = diffcore.load_model("dit", pretrained=str(folder))
    quant = diffcore.load_model("dit", pretrained=str(folder), quantize="int8")
    bare = full.predict(*_inputs(full)).detach()
    for model in (full, quant):
        NetworkAdapter.from_file(model, files[0])
    with torch.no_grad():
        a, b = full.predict(*_inputs(full)), quant.predict(*_inputs(quant))
    assert (a - b).abs().max() < 0.05 * (a - bare).abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("mode,stage,precision", [("fp8", 2, "bf16"), ("int8", 3, "no")])
def test_lora_trains_over_a_quantised_base_under_zero(tmp_path, mode, stage, precision):
    folder = _write_dit(tmp_path / "dit")
    job = _job(folder, tmp_path / "run", quantize=mode, steps=12, checkpoint_every=6, mixed_precision=precision,
               deepspeed={"zero_stage": stage})  # fmt: skip
    losses = run_job(job, tmp_path / "run").losses
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4


# -- bad input ------------------------------------------------------------------------------------
def test_a_full_finetune_of_a_quantised_base_is_a_user_error(tmp_path):
    folder = _write_dit(tmp_path / "dit")
    job = _job(folder, tmp_path / "run", steps=1)
    del job["adapter"]
    with pytest.raises(UserError) as error:
        run_job(job, tmp_path / "run")
    assert "$.model.quantize: the quantised base is frozen" in str(error.value)
    assert "adapter: {type: lora}" in str(error.value)
    assert not (tmp_path / "run" / "job.yaml").exists()


def test_merging_into_a_quantised_base_is_a_user_error(tmp_path):
    model = diffcore.load_model("dit", pretrained=str(_write_dit(tmp_path / "dit")), quantize="nf4")
    adapter = build_component("adapter", "lora", {"rank": 4})
    adapter.attach(model)
    with pytest.raises(UserError, match="cannot fold an adapter into a quantised base"):
        adapter.merge()


def test_a_missing_library_or_an_unsupported_device_is_a_user_error(monkeypatch):
    with pytest.raises(UserError) as error:
        library.require("int8", "mps")
    assert "$.model.quantize" in str(error.value) and "CPU and CUDA" in str(error.value)
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if it were not installed
    with pytest.raises(UserError) as error:
        library.require("nf4")
    assert "nf4 needs torchao" in str(error.value) and "pip install 'diffcore[quant]' (it brings torchao)" in str(error.value)
    # diffcore validate says so before anything loads
    job = {"model": {"type": "dit", **TINY, "quantize": "int8"}, "data": {"type": "synthetic"}}
    with pytest.raises(ConfigError, match=r"\$.model.quantize: int8 needs torchao: pip install 'diffcore\[quant\]'"):
        structure_job(job)


# -- memory ---------------------------------------------------------------------------------------
_MEASURE = textwrap.dedent(
    """
    import sys, tempfile
    import diffcore

    def status(key):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":")) * 1024

    # everything imported and warmed up on a tiny model first: the delta is the big load alone
    tiny = tempfile.mkdtemp()
    diffcore.load_model("dit", hidden_size=64, depth=1, num_heads=2, patch_size=2, in_channels=4,
                        input_size=32, num_classes=10).save_pretrained(tiny)
    diffcore.load_model("dit", pretrained=tiny, quantize="int8")
    # ru_maxrss is the peak since the fork, which starts at pytest's own size: reset the process's
    # peak (VmHWM, what ru_maxrss reports) to its current size instead
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    assert status("VmHWM") - before < 2**20
    model = diffcore.load_model("dit", pretrained=sys.argv[1], quantize="int8", dtype="bfloat16")
    peak = status("VmHWM") - before
    # the bf16 size of the model's weights (the file also holds diffusers' per-block embedder copies)
    weights = [*model.backbone.parameters(), *model.backbone.buffers()]
    print(peak, sum(t.numel() * 2 for t in weights if t.is_floating_point()))
    """
)


def test_a_quantised_load_never_holds_the_full_precision_backbone(tmp_path):
    """Peak RSS while loading a bf16 DiT of 183 MiB of weights (20 blocks of width 512; a 197 MiB
    file) as int8 stays below 0.6x the bf16 size of its weights (int8 itself is 0.5x: the file is
    never held whole, nor mapped)."""
    with torch.device("meta"):  # built without its (slow) initialisation, then filled at random
        big = diffcore.load_model("dit", dtype="bfloat16", hidden_size=512, depth=20, num_heads=8,
                                  patch_size=2, in_channels=4, input_size=32, num_classes=10)  # fmt: skip
    big.backbone.to_empty(device="cpu")
    with torch.no_grad():
        for p in big.backbone.parameters():
            p.normal_(0, 0.05)
    folder = tmp_path / "big"
    big.save_pretrained(folder)
    del big
    size = (folder / "diffusion_pytorch_model.safetensors").stat().st_size
    assert 150e6 < size < 220e6
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(folder)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    peak, bf16 = map(int, result.stdout.strip().splitlines()[-1].split())
    print(f"peak RSS while loading: {peak / 2**20:.1f} MiB for {bf16 / 2**20:.1f} MiB of bf16 weights "
          f"({peak / bf16:.2f}x) in a {size / 2**20:.1f} MiB file")  # fmt: skip
    assert 150e6 < bf16 < size
    assert peak < 0.6 * bf16, (peak, bf16)


def test_an_adapter_trained_on_an_int8_sdxl_loads_into_diffusers_unquantised_unet(tmp_path):
    """The file a quantised run writes goes through diffusers' load_lora_weights into the
    full-precision UNet, every key consumed, and predicts as diffcore's unquantised model with it."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("diffcore_sdxl")
    from diffcore_lora.adapter import NetworkAdapter

    from diffcore.testing.tiny_sd import write_pipeline

    folder = tmp_path / "sdxl"
    write_pipeline(folder, "sdxl", with_vae=True)
    job = {
        "seed": 1,
        "model": {"type": "sdxl", "pretrained": str(folder), "quantize": "int8"},
        "adapter": {"type": "lora", "rank": 4},
        "method": {"type": "diffusion"},
        "data": {"type": "synthetic", "resolution": 16, "size": 8},
        "train": {"steps": 2, "batch_size": 4, "lr": 0.05},
        "callbacks": [{"type": "progress", "enabled": False}],
    }
    run = run_job(job, tmp_path / "run")
    path = run.output_dir / "final" / "adapter.safetensors"
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None,
        text_encoder=transformers.CLIPTextModel.from_pretrained(folder / "text_encoder"),
        text_encoder_2=transformers.CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"),
        tokenizer=None,
        tokenizer_2=None,
        unet=diffusers.UNet2DConditionModel.from_pretrained(folder / "unet"),
        scheduler=diffusers.EulerDiscreteScheduler(),
    )
    pipe.load_lora_weights(str(path))
    with safe_open(str(path), "pt") as f:
        downs = [k for k in f.keys() if k.endswith(".lora_down.weight")]
    lora_layers = [m for m in pipe.unet.modules() if hasattr(m, "lora_A") and len(m.lora_A)]
    assert downs and len(lora_layers) == len(downs)  # every module of the file found its layer
    model = diffcore.load_model("sdxl", pretrained=str(folder))
    NetworkAdapter.from_file(model, path)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 725.0])
    ctx, pooled = torch.randn(2, 11, 192, generator=g), torch.randn(2, 32, generator=g)
    time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2)
    with torch.no_grad():
        want = pipe.unet(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        got = model.backbone(x, t, ctx, pooled=pooled, time_ids=time_ids)
        plain = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")(
            x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
        ).sample
    assert (want - plain).abs().max() > 1e-3  # the trained adapter changes the output
    assert (got - want).abs().max() < 1e-4
