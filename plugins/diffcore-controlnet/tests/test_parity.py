"""The ControlNet against diffusers' ControlNetModel / FluxControlNetModel on the same weights, its
published folder loading with from_pretrained, and the model unchanged at init."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _tiny import SD15_UNET, SDXL_UNET, flux_folder, randomize, unet_folder
from diffcore_controlnet import layouts
from diffcore_controlnet.config import ControlNetConfig
from diffcore_controlnet.method import ControlNetMethod

import diffcore
from diffcore.testing import assert_outputs_close

diffusers = pytest.importorskip("diffusers")

WIDTHS = [8, 16]  # one stride-2 stage: control pixels at twice the latent grid


def _unet_model(tmp_path: Path, family: str):
    shape = SD15_UNET if family == "sd15" else SDXL_UNET
    parts = unet_folder(tmp_path / family, shape, seed=1)
    model = diffcore.load_model(family, pretrained=str(tmp_path / family), load_encoders=False, autoencoder=False)
    return model, parts["unet"]


def _unet_inputs(family: str):
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    cond = {"context": torch.randn(2, 7, 32, generator=g)}
    added = None
    if family == "sdxl":
        cond["pooled"] = torch.randn(2, 16, generator=g)
        cond["time_ids"] = torch.tensor([[16.0, 16, 0, 0, 16, 16], [32, 24, 4, 0, 16, 16]])
        added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
    control = torch.rand(2, 3, 16, 16, generator=g)  # [0, 1], what diffusers' ControlNets take
    return latents, torch.tensor([999.0, 321.0]), cond, added, control


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_unet_controlnet_matches_diffusers_and_loads_with_from_pretrained(tmp_path: Path, family: str) -> None:
    model, _ = _unet_model(tmp_path, family)
    method = ControlNetMethod(ControlNetConfig(conditioning_embedding_out_channels=WIDTHS))
    net = randomize(method.modules(model)["controlnet"], seed=2)
    folder = layouts.save_folder(net, net.state_dict(), tmp_path / "cn", {})
    reference = diffusers.ControlNetModel.from_pretrained(str(folder)).eval()
    assert set(reference.state_dict()) == set(net.diffusers_state(net.state_dict()))

    latents, t, cond, added, control = _unet_inputs(family)
    with torch.no_grad():
        ours = net(latents, t, cond, control, scale=0.7)
        down, mid = reference(
            latents,
            t,
            cond["context"],
            control,
            conditioning_scale=0.7,
            added_cond_kwargs=added,
            return_dict=False,
        )
    assert len(ours["down_block_residuals"]) == len(down) == 4  # conv_in, one resnet per level, a downsampler
    for i, (a, b) in enumerate(zip(ours["down_block_residuals"], down)):
        assert_outputs_close(a, b, atol=1e-4, what=f"down residual {i}")
    assert_outputs_close(ours["mid_block_residual"], mid, atol=1e-4, what="mid residual")
    assert float(mid.abs().mean()) > 1e-2  # the comparison saw real signal


def test_unet_model_output_is_unchanged_at_init(tmp_path: Path) -> None:
    model, unet = _unet_model(tmp_path, "sd15")
    method = ControlNetMethod(ControlNetConfig(conditioning_embedding_out_channels=WIDTHS))
    method.modules(model)
    latents, t, cond, _, control = _unet_inputs("sd15")
    batch = {"control": control * 2 - 1}
    with torch.no_grad():
        alone = model.predict(latents, t, cond)
        steered = method.predict(model, latents, t, cond, batch)
        reference = unet(latents, t, cond["context"]).sample
    assert torch.equal(alone, steered)
    assert_outputs_close(alone, reference, atol=1e-4)
    # and a trained (non-zero) ControlNet does move it
    randomize(method.net, seed=3)
    with torch.no_grad():
        assert (method.predict(model, latents, t, cond, batch) - alone).abs().max() > 1e-3


def _flux(tmp_path: Path):
    reference = flux_folder(tmp_path / "transformer", seed=1)
    model = diffcore.load_model("flux", pretrained=str(tmp_path / "transformer"))
    return model, reference


def _flux_inputs():
    g = torch.Generator().manual_seed(4)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    control = torch.randn(2, 4, 8, 8, generator=g)  # the control image's latents
    cond = {"txt": torch.randn(2, 5, 32, generator=g), "pooled": torch.randn(2, 32, generator=g)}
    return latents, control, cond, torch.tensor([0.9, 0.3]), torch.tensor([3.5, 3.5])


def test_flux_controlnet_and_residuals_match_diffusers(tmp_path: Path) -> None:
    from diffcore_flux.packing import image_ids, pack, text_ids, unpack

    model, transformer = _flux(tmp_path)
    # fewer ControlNet blocks than the transformer's: the backbone spreads them (interval rule)
    method = ControlNetMethod(ControlNetConfig(num_layers=1, num_single_layers=1))
    net = randomize(method.modules(model)["controlnet"], seed=2)
    folder = layouts.save_folder(net, net.state_dict(), tmp_path / "cn", {})
    reference = diffusers.FluxControlNetModel.from_pretrained(str(folder)).eval()
    assert set(reference.state_dict()) == set(net.diffusers_state(net.state_dict()))

    latents, control, cond, t, g = _flux_inputs()
    img_ids, txt_ids = image_ids(8, 8), text_ids(5)
    with torch.no_grad():
        ours = net(latents, t, cond, control, scale=0.8, guidance=g)
        blocks, singles = reference(
            hidden_states=pack(latents),
            controlnet_cond=pack(control),
            conditioning_scale=0.8,
            encoder_hidden_states=cond["txt"],
            pooled_projections=cond["pooled"],
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=g,
            return_dict=False,
        )
        assert len(ours["controlnet_block_samples"]) == len(blocks) == 1
        assert len(ours["controlnet_single_block_samples"]) == len(singles) == 1
        assert_outputs_close(ours["controlnet_block_samples"][0], blocks[0], atol=1e-4, what="double")
        assert_outputs_close(ours["controlnet_single_block_samples"][0], singles[0], atol=1e-4, what="single")

        got = model.predict(latents, t, cond, guidance=g, **ours)
        want = transformer(
            hidden_states=pack(latents),
            encoder_hidden_states=cond["txt"],
            pooled_projections=cond["pooled"],
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=g,
            controlnet_block_samples=blocks,
            controlnet_single_block_samples=singles,
            return_dict=False,
        )[0]
        assert_outputs_close(got, unpack(want, 8, 8), atol=1e-4, what="transformer with residuals")
        alone = model.predict(latents, t, cond, guidance=g)
    assert (got - alone).abs().max() > 1e-3


def test_flux_model_output_is_unchanged_at_init(tmp_path: Path) -> None:
    model, _ = _flux(tmp_path)
    method = ControlNetMethod(ControlNetConfig(num_layers=2, num_single_layers=1))
    net = method.modules(model)["controlnet"]
    latents, control, cond, t, g = _flux_inputs()
    with torch.no_grad():
        residuals = net(latents, t, cond, control, guidance=g)
        assert torch.equal(model.predict(latents, t, cond, guidance=g, **residuals), model.predict(latents, t, cond, guidance=g))


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_a_saved_folder_is_where_a_run_or_sample_can_start(tmp_path: Path, family: str) -> None:
    if family == "flux":
        model, _ = _flux(tmp_path)
        options = {"num_layers": 2, "num_single_layers": 1}
    else:
        model, _ = _unet_model(tmp_path, family)
        options = {"conditioning_embedding_out_channels": WIDTHS}
    net = randomize(ControlNetMethod(ControlNetConfig(**options)).modules(model)["controlnet"], seed=4)
    folder = layouts.save_folder(net, net.state_dict(), tmp_path / "cn", {})
    again = ControlNetMethod(ControlNetConfig(pretrained=str(folder))).modules(model)["controlnet"]
    ours, theirs = net.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_latent_hint_without_an_autoencoder_is_a_user_error(tmp_path: Path) -> None:
    from diffcore.errors import UserError

    model, _ = _flux(tmp_path)  # no VAE loaded
    method = ControlNetMethod(ControlNetConfig(num_layers=1, num_single_layers=0))
    method.modules(model)
    latents, _, cond, t, g = _flux_inputs()
    with pytest.raises(UserError, match="no autoencoder") as err:
        method.predict(model, latents, t, cond, {"control": torch.zeros(2, 3, 64, 64)}, guidance=g)
    assert err.value.where == "$.model"
