"""The Flux.2 transformer against diffusers' Flux2Transformer2DModel, through both checkpoint layouts."""

from __future__ import annotations

import pytest
import torch
from _flux2_tiny import AXES, LATENT_CHANNELS, TEXT_DIM, reference_transformer, variant
from diffcore_flux.flux2.edit import flatten, grid_ids, reference_ids, text_ids

import diffcore
from diffcore.errors import UserError
from diffcore.testing import assert_outputs_close
from diffcore.weights import Checkpoint, save_safetensors

DEV = [True, False]
IDS = ["dev", "klein"]


def _inputs(dev: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    b, h, w, length = 2, 3, 4, 5
    target = torch.randn(b, LATENT_CHANNELS, h, w, generator=g)
    ref = torch.randn(b, LATENT_CHANNELS, 2, 3, generator=g)  # a Kontext reference of another size
    return dict(
        img=torch.cat((flatten(target), flatten(ref)), dim=1),
        img_ids=torch.cat((grid_ids(h, w), reference_ids([(2, 3)])), dim=0),
        txt=torch.randn(b, length, TEXT_DIM, generator=g),
        txt_ids=text_ids(length),
        t=torch.rand(b, generator=g),
        guidance=torch.full((b,), 3.5) if dev else None,
    )


def _reference_out(ref, x) -> torch.Tensor:
    with torch.no_grad():
        return ref(
            hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["t"], img_ids=x["img_ids"],
            txt_ids=x["txt_ids"], guidance=x["guidance"],
        ).sample  # fmt: skip


def _our_out(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model.backbone(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["guidance"])


@pytest.mark.parametrize("dev", DEV, ids=IDS)
def test_parity_through_both_layouts(tmp_path, dev):
    ref = reference_transformer(dev)
    ref.save_pretrained(tmp_path / "diffusers")
    x = _inputs(dev)
    expected = _reference_out(ref, x)
    name = variant(dev)

    model = diffcore.load_model("flux2", pretrained=tmp_path / "diffusers", variant=name)
    assert model.backbone.shape.axes_dim == AXES and model.backbone.shape.theta == 2000
    assert_outputs_close(_our_out(model, x), expected, atol=1e-4)

    file = model.save_pretrained(tmp_path / "bfl.safetensors", layout="original")
    saved = dict(Checkpoint(file).items())  # BFL's names: fused qkv, QK-norm "scale", shared modulation
    keys = set(saved)
    assert {"double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_attn.norm.query_norm.scale",
            "single_blocks.1.linear1.weight", "double_stream_modulation_img.lin.weight",
            "single_stream_modulation.lin.weight", "final_layer.adaLN_modulation.1.weight"} <= keys  # fmt: skip
    assert ("guidance_in.in_layer.weight" in keys) == dev
    assert not any(k.endswith(".bias") for k in keys)
    comfy = tmp_path / "comfy.safetensors"
    save_safetensors({"model.diffusion_model." + k: v for k, v in saved.items()}, comfy)
    for path in (file, comfy):
        from_original = diffcore.load_model("flux2", pretrained=path, variant=name)
        assert from_original.backbone.shape == model.backbone.shape
        assert_outputs_close(_our_out(from_original, x), expected, atol=1e-4)

    # Saving in the diffusers layout gives back diffusers' own tensors, key for key.
    folder = from_original.save_pretrained(tmp_path / "resaved", layout="diffusers")
    saved = dict(Checkpoint(folder).items())
    reference = ref.state_dict()
    assert saved.keys() == reference.keys()
    assert all(torch.equal(saved[k], reference[k]) for k in reference)
    from diffusers import Flux2Transformer2DModel

    reloaded = Flux2Transformer2DModel.from_pretrained(folder).eval()
    assert_outputs_close(_reference_out(reloaded, x), expected, atol=1e-6)

    # A single file with diffusers key names (under "transformer.") loads as well.
    save_safetensors({"transformer." + k: v for k, v in reference.items()}, tmp_path / "keys.safetensors")
    single = diffcore.load_model("flux2", pretrained=tmp_path / "keys.safetensors", variant=name)
    assert_outputs_close(_our_out(single, x), expected, atol=1e-4)


def test_diffusers_single_file_converter_reads_our_original_file(tmp_path):
    """diffusers' own BFL converter (what from_single_file uses) reads a file diffcore wrote."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    ref = reference_transformer(True)
    ref.save_pretrained(tmp_path / "diffusers")
    model = diffcore.load_model("flux2", pretrained=tmp_path / "diffusers", variant="dev")
    original = model.export_state_dict("original")
    converted = convert_flux2_transformer_checkpoint_to_diffusers(dict(original))
    reference = ref.state_dict()
    assert converted.keys() == reference.keys()
    assert all(torch.equal(converted[k], reference[k]) for k in reference)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = diffcore.load_model("flux2", variant="klein-4b", shape=dict(
        hidden_size=32, num_heads=2, depth=1, depth_single=1, axes_dim=list(AXES), in_channels=LATENT_CHANNELS,
        context_in_dim=TEXT_DIM))  # fmt: skip
    x = _inputs(False)
    grads = []
    for on in (False, True):
        model.set_gradient_checkpointing(on)
        model.backbone.zero_grad()
        model.backbone(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"]).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.backbone.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
    assert model.repeated_blocks() == ["double_blocks", "single_blocks"]
    assert all(isinstance(model.backbone.get_submodule(p), torch.nn.ModuleList) for p in model.repeated_blocks())
    flops = model.flops_per_sample(torch.zeros(1, LATENT_CHANNELS, 4, 4))
    assert flops is not None and flops > model.flops_per_sample(torch.zeros(1, LATENT_CHANNELS, 2, 2))


def test_released_variant_sizes():
    from diffcore_flux.flux2.config import VARIANTS

    for name, (hidden, double, single, context, guidance) in {
        "dev": (6144, 8, 48, 15360, True), "klein-9b": (4096, 8, 24, 12288, False),
        "klein-4b": (3072, 5, 20, 7680, False),
    }.items():  # fmt: skip
        s = VARIANTS[name]
        assert (s.hidden_size, s.depth, s.depth_single, s.context_in_dim, s.guidance_embed) == (
            hidden, double, single, context, guidance)  # fmt: skip
        assert s.hidden_size // s.num_heads == 128 and sum(s.axes_dim) == 128 and s.mlp_ratio == 3.0


def test_wrong_checkpoints_are_user_errors(tmp_path):
    from _flux_tiny import AXES as FLUX1_AXES
    from _flux_tiny import reference_transformer as flux1_transformer

    flux1 = flux1_transformer(True)
    save_safetensors(dict(flux1.state_dict()), tmp_path / "flux1_diffusers.safetensors")
    flux1.save_pretrained(tmp_path / "flux1")
    bfl = diffcore.load_model("flux", pretrained=tmp_path / "flux1", axes_dim=FLUX1_AXES).save_pretrained(
        tmp_path / "flux1-dev.safetensors", layout="original"
    )
    for path in (tmp_path / "flux1_diffusers.safetensors", tmp_path / "flux1", bfl):
        with pytest.raises(UserError, match="Flux.1") as info:
            diffcore.load_model("flux2", pretrained=path)
        assert "'flux'" in info.value.hint
    ref = reference_transformer(False)
    ref.save_pretrained(tmp_path / "klein")
    with pytest.raises(UserError, match="no guidance embedding .* variant is 'dev'"):
        diffcore.load_model("flux2", pretrained=tmp_path / "klein", variant="dev")


@pytest.mark.parametrize("dev", DEV, ids=IDS)
@pytest.mark.parametrize("keep", [None, 12], ids=["all", "target"])
def test_gradients_match_diffusers(tmp_path, dev, keep):
    """Backward through the lean norm/modulation and SwiGLU functions gives diffusers' gradients, also
    when only the target's tokens are kept (the last block then computes those rows only)."""
    ref = reference_transformer(dev)
    ref.save_pretrained(tmp_path / "diffusers")
    model = diffcore.load_model("flux2", pretrained=tmp_path / "diffusers", variant=variant(dev))
    grads = []
    for run in ("ours", "theirs"):
        x = _inputs(dev)
        x["img"].requires_grad_(True)
        x["txt"].requires_grad_(True)
        if run == "ours":
            out = model.backbone(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["guidance"], keep=keep)
        else:
            out = ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["t"], img_ids=x["img_ids"],
                      txt_ids=x["txt_ids"], guidance=x["guidance"]).sample[:, :keep]  # fmt: skip
        out.square().mean().backward()
        grads.append((out.detach(), x["img"].grad, x["txt"].grad))
    assert grads[0][0].shape[1] == (keep or x["img"].shape[1])
    for ours, theirs in zip(grads[0], grads[1], strict=True):
        assert_outputs_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_lean_functions_have_the_compositions_gradients():
    from diffcore_flux.flux2.lean import norm_modulate, swiglu

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    shift = torch.randn(2, 6, dtype=torch.float64, generator=g, requires_grad=True)
    scale = torch.randn(2, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: norm_modulate(a, b, c), (x, shift, scale))
    want = torch.nn.functional.layer_norm(x, (6,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(norm_modulate(x, shift, scale), want)
    y = torch.randn(2, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (y,))
    torch.testing.assert_close(swiglu(y), torch.nn.functional.silu(y[..., :4]) * y[..., 4:])

    from diffcore_flux.flux2.lean import apply_rope as complex_rope
    from diffcore_flux.flux2.lean import rope_cis

    from diffcore.nn import apply_rope, rope_frequencies

    tables = rope_frequencies(grid_ids(3, 4), AXES, 2000.0)
    q = torch.randn(2, 3, 12, sum(AXES), generator=g)
    torch.testing.assert_close(complex_rope(q, rope_cis(*tables)), apply_rope(q, *tables))

    from diffcore_flux.flux2.lean import rms_rope

    cis = rope_cis(*(t.double() for t in tables))
    q = torch.randn(2, 3, 12, sum(AXES), dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(sum(AXES), dtype=torch.float64, generator=g, requires_grad=True)
    want = apply_rope(torch.nn.functional.rms_norm(q, (sum(AXES),), weight, 1e-6), *(t.double() for t in tables))
    torch.testing.assert_close(rms_rope(q, weight, cis), want)
    assert torch.autograd.gradcheck(lambda a, w: rms_rope(a, w, cis), (q, weight))


@pytest.mark.parametrize("rows", [None, slice(2, 5), slice(0, 6)], ids=["all", "middle", "leading"])
def test_split_heads_has_the_compositions_values_and_gradients(rows):
    """The fused projections' split (and a single block's SwiGLU half) with its one-buffer backward:
    q, k, v and the SwiGLU of the kept rows equal slicing, and gradcheck holds (zeros where rows skip)."""
    from diffcore_flux.flux2.lean import split_heads, split_heads_swiglu

    g = torch.Generator().manual_seed(0)
    heads, head, hidden = 2, 3, 4
    y = torch.randn(2, 7, 3 * heads * head + 2 * hidden, dtype=torch.float64, generator=g, requires_grad=True)
    kept = rows or slice(None)
    q, k, v = y[..., : 3 * heads * head].unflatten(-1, (3, heads, head)).permute(2, 0, 3, 1, 4)
    gate, value = y[:, kept, 3 * heads * head :].chunk(2, dim=-1)
    for got, want in zip(
        split_heads_swiglu(y, heads, hidden, rows), (q[:, :, kept], k, v, torch.nn.functional.silu(gate) * value)
    ):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda t: split_heads_swiglu(t, heads, hidden, rows), (y,))
    x = y[..., : 3 * heads * head].detach().clone().requires_grad_(True)
    for got, want in zip(split_heads(x, heads), (q, k, v)):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda t: split_heads(t, heads), (x,))


def test_export_loads_back_and_the_cli_refuses_a_flux1_checkpoint(tmp_path):
    """A full finetune's model.safetensors (diffusers layout) loads back through load_exported; handing
    a Flux.1 checkpoint to ``flux2`` on the command line exits 2 with the reason."""
    from _flux_tiny import reference_transformer as flux1_transformer

    from diffcore.testing import run_cli

    ref = reference_transformer(False)
    ref.save_pretrained(tmp_path / "klein")
    trained = diffcore.load_model("flux2", pretrained=tmp_path / "klein", variant="klein-4b")
    with torch.no_grad():
        for p in trained.backbone.parameters():
            p.mul_(1.1)
    fresh = diffcore.load_model("flux2", pretrained=tmp_path / "klein", variant="klein-4b")
    x = _inputs(False)
    assert (_our_out(fresh, x) - _our_out(trained, x)).abs().max() > 1e-3
    fresh.load_exported(trained.export_state_dict("diffusers"))
    assert torch.equal(_our_out(fresh, x), _our_out(trained, x))

    flux1_transformer(True).save_pretrained(tmp_path / "flux1")
    out = run_cli("sample", "--model", "flux2", "--pretrained", str(tmp_path / "flux1"), "--prompt", "x")
    assert out.returncode == 2
    assert "not a Flux2Transformer2DModel" in out.stderr and "use model type 'flux'" in out.stderr


def test_blocks_trace_whole_under_torch_compile():
    """The lean autograd functions leave no graph break in a block (torch.compile's per-block mode)."""
    from diffcore_flux.flux2.lean import rope_cis
    from diffcore_flux.flux2.network import DoubleStreamBlock, SingleStreamBlock

    torch.manual_seed(0)
    single, double = SingleStreamBlock(16, 2, 24), DoubleStreamBlock(16, 2, 24)
    x = torch.randn(2, 7, 16, requires_grad=True)
    mod = tuple(torch.randn(2, 16) for _ in range(6))
    rope = rope_cis(torch.randn(7, 4).cos(), torch.randn(7, 4).sin())
    for block, args in ((single, (x, mod[:3], rope, slice(3, 6))), (double, (x[:, 3:], x[:, :3], mod, mod, rope))):
        compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
        eager, traced = block(*args), compiled(*args)
        eager, traced = (eager, traced) if isinstance(eager, tuple) else ((eager,), (traced,))
        for a, b in zip(eager, traced, strict=True):
            torch.testing.assert_close(b, a)
        grads = [torch.autograd.grad(sum(o.square().sum() for o in out), x)[0] for out in (eager, traced)]
        torch.testing.assert_close(grads[1], grads[0])
