"""Training-step time, peak memory and MFU on a CUDA GPU: diffcore eager and compiled beside diffusers
eager and compiled, in one run.

Three cases with random weights, in bf16 (weights and activations; AdamW fused):

- ``flux``: a Flux.1-dev-shaped transformer (3072 wide, 19 double + 38 single blocks) with a rank-16
  LoRA on the attention, MLP and modulation linears, at 1024 px (4096 image + 512 text tokens);
- ``sdxl``: an SDXL-shaped UNet (320-640-1280 channels, 1/2/10 transformer layers) with a rank-16
  LoRA on the attention, feed-forward and projection layers, at 1024 px;
- ``dit``: DiT-XL/2 at 256 px (32 x 32 latents, learned sigma), a full finetune.

For each case and batch size: diffcore eager, diffcore compiled (``train.compile: blocks``, through
:func:`diffcore.training.compile.compile_backbone`), diffusers eager and diffusers compiled
(``compile_repeated_blocks``, or ``torch.compile`` of the whole model when diffusers declares no
repeated blocks). Each prints ms/step (after warm-up steps that also absorb compilation), the
peak ``torch.cuda.max_memory_allocated`` and MFU: the model's own ``flops_per_sample`` x 3 for a full
finetune, x 2 with a frozen base (docs/speed.md), over the table's dense bf16 peak of the GPU
(``--peak-tflops`` overrides it). diffusers' runs use diffcore's FLOPs count of the same shapes.

    python benchmarks/gpu_step.py                       # every case, batch 1 and 4
    python benchmarks/gpu_step.py --cases flux --batch-sizes 1,2 --checkpointing
    python benchmarks/gpu_step.py --tiny --device cpu   # a smoke run of the script on tiny shapes

Without a CUDA device (and without ``--tiny``) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import time
from collections.abc import Callable
from typing import Any

import attrs
import torch
import torch.nn.functional as F


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="flux,sdxl,dit", help="comma-separated: flux, sdxl, dit")
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--runs", default="diffcore,diffcore-compiled,diffusers,diffusers-compiled")
    p.add_argument("--checkpointing", action="store_true", help="per-block activation checkpointing in both")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of the flux and sdxl cases")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (else the table)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="shrunk shapes (a smoke run; works on the CPU)")
    return p.parse_args()


@attrs.define
class Case:
    """One architecture: how diffcore and diffusers build it and what one step feeds them."""

    name: str
    #: diffcore's model (``backbone``, ``predict``, ``flops_per_sample``) and its trainable parameters
    diffcore: Callable[[], tuple[Any, list[torch.nn.Parameter]]]
    #: (module, trainable parameters) for diffusers
    diffusers: Callable[[], tuple[Any, list[torch.nn.Parameter]]]
    #: batch size -> one step's inputs; each side's loss of them
    inputs: Callable[[int], dict[str, Any]]
    diffcore_loss: Callable[[Any, dict[str, Any]], torch.Tensor]
    diffusers_loss: Callable[[Any, dict[str, Any]], torch.Tensor]
    #: the latents of one sample (for the FLOPs count) and the forward multiplier (3 full, 2 LoRA)
    latent_shape: tuple[int, int, int]
    passes: int


# -- the cases -------------------------------------------------------------------------------------
def flux_case(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Case:
    tiny = args.tiny
    dim, heads = (64, 2) if tiny else (3072, 24)
    depth, single = (1, 2) if tiny else (19, 38)
    axes = [8, 12, 12] if tiny else [16, 56, 56]
    text_dim, pooled_dim, text_len = (32, 32, 16) if tiny else (4096, 768, 512)
    side = 16 if tiny else 128  # latents of 1024 px

    def ours():
        import diffcore

        with torch.device(device):
            model = diffcore.load_model(
                "flux", load_encoders=False, hidden_size=dim, num_heads=heads, depth=depth, depth_single=single,
                axes_dim=axes, context_in_dim=text_dim, vec_in_dim=pooled_dim, max_sequence_length=text_len,
                dtype="bfloat16" if dtype == torch.bfloat16 else "float32",  # built in bf16: 24 GB, not 48
            )  # fmt: skip
        model.to(device, dtype=dtype)
        model.set_gradient_checkpointing(args.checkpointing)
        return model, lora(model, args.rank)

    def theirs():
        from diffusers import FluxTransformer2DModel

        with torch.device(device):
            module = FluxTransformer2DModel(
                in_channels=64, num_layers=depth, num_single_layers=single, attention_head_dim=dim // heads,
                num_attention_heads=heads, joint_attention_dim=text_dim, pooled_projection_dim=pooled_dim,
                guidance_embeds=True, axes_dims_rope=tuple(axes),
            ).to(dtype)  # fmt: skip
        if args.checkpointing:
            module.enable_gradient_checkpointing()
        # the layers diffcore's Flux LoRA wraps: attention, MLPs and modulations of every block
        targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                   "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
                   "norm1_context.linear", "norm.linear", "proj_mlp", "proj_out"]  # fmt: skip
        return module, peft_lora(module, targets, args.rank)

    def inputs(batch: int) -> dict[str, Any]:
        from diffcore_flux.packing import image_ids, pack, text_ids

        latents = torch.randn(batch, 16, side, side, device=device, dtype=dtype)
        return {
            "latents": latents, "packed": pack(latents), "img_ids": image_ids(side, side, device=device),
            "txt": torch.randn(batch, text_len, text_dim, device=device, dtype=dtype),
            "txt_ids": text_ids(text_len, device=device), "pooled": torch.randn(batch, pooled_dim, device=device, dtype=dtype),
            "t": torch.rand(batch, device=device), "guidance": torch.ones(batch, device=device),
        }  # fmt: skip

    def our_loss(model, x):
        pred = model.predict(x["latents"], x["t"], {"txt": x["txt"], "pooled": x["pooled"]}, guidance=1.0)
        return F.mse_loss(pred.float(), x["latents"].float())

    def their_loss(module, x):
        pred = module(
            hidden_states=x["packed"], encoder_hidden_states=x["txt"], pooled_projections=x["pooled"],
            timestep=x["t"].to(dtype), img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"].to(dtype),
            return_dict=False,
        )[0]  # fmt: skip
        return F.mse_loss(pred.float(), x["packed"].float())

    return Case("flux", ours, theirs, inputs, our_loss, their_loss, (16, side, side), 2)


def sdxl_case(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Case:
    tiny = args.tiny
    channels = (32, 64, 64) if tiny else (320, 640, 1280)
    layers = (1, 1, 2) if tiny else (1, 2, 10)
    heads = (2, 2, 2) if tiny else (5, 10, 20)
    context, pooled, time_dim = (64, 32, 8) if tiny else (2048, 1280, 256)
    side = 16 if tiny else 128
    unet = {"block_out_channels": list(channels), "attention": [False, True, True], "transformer_layers": list(layers),
            "heads": list(heads), "cross_attention_dim": context, "linear_projection": True,
            "addition_time_embed_dim": time_dim, "addition_input_dim": pooled + 6 * time_dim,
            "norm_groups": 8 if tiny else 32}  # fmt: skip

    def ours():
        import diffcore

        with torch.device(device):
            model = diffcore.load_model("sdxl", unet=unet, load_encoders=False)
        model.to(device, dtype=dtype)
        model.set_gradient_checkpointing(args.checkpointing)
        return model, lora(model, args.rank)

    def theirs():
        from diffusers import UNet2DConditionModel

        with torch.device(device):
            module = UNet2DConditionModel(
                sample_size=side, in_channels=4, out_channels=4, block_out_channels=channels,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=layers, attention_head_dim=heads, cross_attention_dim=context,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                projection_class_embeddings_input_dim=pooled + 6 * time_dim, layers_per_block=2,
                norm_num_groups=8 if tiny else 32,
            ).to(dtype)  # fmt: skip
        if args.checkpointing:
            module.enable_gradient_checkpointing()
        targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
        return module, peft_lora(module, targets, args.rank)

    def inputs(batch: int) -> dict[str, Any]:
        size = float(side * 8)
        return {
            "latents": torch.randn(batch, 4, side, side, device=device, dtype=dtype),
            "t": torch.randint(0, 1000, (batch,), device=device).float(),
            "context": torch.randn(batch, 77, context, device=device, dtype=dtype),
            "pooled": torch.randn(batch, pooled, device=device, dtype=dtype),
            "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]] * batch, device=device, dtype=dtype),
        }

    def our_loss(model, x):
        pred = model.predict(x["latents"], x["t"], {"context": x["context"], "pooled": x["pooled"], "time_ids": x["time_ids"]})
        return F.mse_loss(pred.float(), x["latents"].float())

    def their_loss(module, x):
        pred = module(
            x["latents"], x["t"], encoder_hidden_states=x["context"],
            added_cond_kwargs={"text_embeds": x["pooled"], "time_ids": x["time_ids"]}, return_dict=False,
        )[0]  # fmt: skip
        return F.mse_loss(pred.float(), x["latents"].float())

    return Case("sdxl", ours, theirs, inputs, our_loss, their_loss, (4, side, side), 2)


def dit_case(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Case:
    tiny = args.tiny
    hidden, depth, heads = (64, 2, 2) if tiny else (1152, 28, 16)
    side = 8 if tiny else 32  # latents of 256 px

    def ours():
        import diffcore

        with torch.device(device):
            model = diffcore.load_model(
                "dit", hidden_size=hidden, depth=depth, num_heads=heads, patch_size=2, in_channels=4,
                input_size=side, num_classes=1000, learn_sigma=True,
            )  # fmt: skip
        model.to(device, dtype=dtype)
        model.set_gradient_checkpointing(args.checkpointing)
        return model, [p for p in model.backbone.parameters() if p.requires_grad]

    def theirs():
        from diffusers import DiTTransformer2DModel

        with torch.device(device):
            module = DiTTransformer2DModel(
                num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=4, out_channels=8,
                num_layers=depth, sample_size=side, patch_size=2, num_embeds_ada_norm=1000,
            ).to(dtype)  # fmt: skip
        if args.checkpointing:
            module.enable_gradient_checkpointing()
        return module, list(module.parameters())

    def inputs(batch: int) -> dict[str, Any]:
        return {
            "latents": torch.randn(batch, 4, side, side, device=device, dtype=dtype),
            "t": torch.randint(0, 1000, (batch,), device=device).float(),
            "labels": torch.randint(0, 1000, (batch,), device=device),
        }

    def our_loss(model, x):
        return F.mse_loss(model.predict(x["latents"], x["t"], x["labels"]).float(), x["latents"].float())

    def their_loss(module, x):
        pred = module(x["latents"], timestep=x["t"], class_labels=x["labels"], return_dict=False)[0]
        return F.mse_loss(pred[:, :4].float(), x["latents"].float())  # the learned-variance half aside

    return Case("dit", ours, theirs, inputs, our_loss, their_loss, (4, side, side), 3)


CASES = {"flux": flux_case, "sdxl": sdxl_case, "dit": dit_case}


# -- adapters ----------------------------------------------------------------------------------------
def lora(model: Any, rank: int) -> list[torch.nn.Parameter]:
    """diffcore-lora on the model's default targets; its trainable parameters."""
    from diffcore.api import build_component, component_config

    adapter = build_component("adapter", "lora", component_config("adapter", "lora", {"rank": rank, "alpha": rank}))
    return list(adapter.attach(model))


def peft_lora(module: Any, targets: list[str], rank: int) -> list[torch.nn.Parameter]:
    from peft import LoraConfig

    module.requires_grad_(False)
    module.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights="gaussian"))
    return [p for p in module.parameters() if p.requires_grad]


# -- compiling -----------------------------------------------------------------------------------------
def compile_ours(model: Any) -> str | None:
    """``train.compile: blocks`` on diffcore's backbone, as the training loop applies it."""
    from diffcore.training.compile import compile_backbone

    compile_backbone(model, "blocks")
    return None


def compile_theirs(module: Any) -> str | None:
    if getattr(module, "_repeated_blocks", None):
        module.compile_repeated_blocks(fullgraph=True)
    else:
        module.compile()  # nn.Module.compile: in place, the whole forward
    return None


# -- timing ---------------------------------------------------------------------------------------------
@attrs.define
class Result:
    case: str
    run: str
    batch: int
    ms: float | None = None
    peak_gib: float | None = None
    mfu: float | None = None
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    loss_fn: Callable[[], torch.Tensor], opt: torch.optim.Optimizer, steps: int, warmup: int, device: torch.device
) -> float:
    """Seconds per optimizer step, from device sync to device sync, after ``warmup`` steps."""
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return (time.perf_counter() - start) / steps


def run_side(
    case: Case, side: str, built: tuple[Any, list[torch.nn.Parameter]], args: argparse.Namespace,
    device: torch.device, flops: float, peak: float | None,
) -> list[Result]:
    """One implementation's eager runs for every batch size, then (compiled once) its compiled runs."""
    batches = [int(b) for b in args.batch_sizes.split(",")]
    runs = args.runs.split(",")
    wanted = [r for r in (side, f"{side}-compiled") if r in runs]
    target, params = built
    loss = case.diffcore_loss if side == "diffcore" else case.diffusers_loss
    fused = {"fused": True}
    opt = torch.optim.AdamW(params, lr=1e-5, **fused)
    results = []
    for run in wanted:
        note = ""
        if run.endswith("-compiled"):
            note = (compile_ours if side == "diffcore" else compile_theirs)(target) or ""
            if note:
                results += [Result(case.name, run, b, note=f"skipped: {note}") for b in batches]
                continue
        for batch in batches:
            x = case.inputs(batch)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                seconds = time_steps(functools.partial(loss, target, x), opt, args.steps, args.warmup, device)
            except torch.cuda.OutOfMemoryError:
                opt.zero_grad(set_to_none=True)
                results.append(Result(case.name, run, batch, note="out of memory"))
                _free(device)
                continue
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
            mfu = flops * case.passes * batch / seconds / 1e12 / peak if peak else None
            results.append(Result(case.name, run, batch, seconds * 1000, mem, mfu, note))
            print(_row(results[-1]), flush=True)
    del target, params, opt, built
    _free(device)
    return results


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _row(r: Result) -> str:
    ms = f"{r.ms:9.1f}" if r.ms is not None else f"{'-':>9}"
    mem = f"{r.peak_gib:8.1f}" if r.peak_gib is not None else f"{'-':>8}"
    mfu = f"{100 * r.mfu:6.1f}%" if r.mfu is not None else f"{'-':>7}"
    return f"  {r.case:<5} {r.run:<19} {r.batch:>5} {ms} {mem} {mfu}  {r.note}"


def main() -> int:
    args = parse()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available() or device.type != "cuda" and not args.tiny:
        print("gpu_step.py measures CUDA training steps and torch sees no CUDA device here: nothing to measure. "
              "On a CPU, benchmarks/compile_step.py compares eager and compiled steps; "
              "`--tiny --device cpu` smoke-runs this script on tiny shapes.")  # fmt: skip
        return 0
    from diffcore.training.throughput import device_peak

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (device_peak(name, "bf16") if device.type == "cuda" else None)
    torch.backends.cuda.matmul.allow_tf32 = True  # diffcore's default fast path; both sides get it
    torch.backends.cudnn.allow_tf32 = True
    print(f"gpu_step: {name}, {dtype}, peak {peak or 'unknown'} TFLOP/s dense, steps {args.steps} after {args.warmup} "
          f"warm-up, checkpointing {'on' if args.checkpointing else 'off'}{', tiny shapes' if args.tiny else ''}")  # fmt: skip
    print(f"  {'case':<5} {'run':<19} {'batch':>5} {'ms/step':>9} {'peak GiB':>8} {'MFU':>7}")
    results: list[Result] = []
    for key in args.cases.split(","):
        torch.manual_seed(0)
        case = CASES[key](args, device, dtype)
        ours = case.diffcore()
        # diffcore's count of one sample's forward FLOPs; diffusers' runs have the same shapes
        flops = float(ours[0].flops_per_sample(torch.empty((1, *case.latent_shape), device="meta")))
        results += run_side(case, "diffcore", ours, args, device, flops, peak)
        del ours
        _free(device)
        if any(r.startswith("diffusers") for r in args.runs.split(",")):
            results += run_side(case, "diffusers", case.diffusers(), args, device, flops, peak)
    print("\nsummary (ms/step; diffcore / diffusers ratios below 1 favour diffcore):")
    for r in results:
        if r.ms is None:
            print(_row(r))
    for key in args.cases.split(","):
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            got = {r.run: r.ms for r in results if r.case == key and r.batch == batch and r.ms is not None}
            if "diffcore" in got and "diffusers" in got:
                line = f"  {key} batch {batch}: eager {got['diffcore'] / got['diffusers']:.2f}"
                if "diffcore-compiled" in got:
                    line += f", compiled vs diffusers eager {got['diffcore-compiled'] / got['diffusers']:.2f}"
                    if "diffusers-compiled" in got:
                        line += f", vs diffusers compiled {got['diffcore-compiled'] / got['diffusers-compiled']:.2f}"
                print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
