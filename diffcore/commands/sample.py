"""``diffcore sample``: images from a job's output (final weights or a checkpoint) or a pretrained model.

Generation goes through :func:`diffcore.sampling.generate`, the code the training-time sample callback
uses, so the images match what training showed.

Trained weights: ``adapter.safetensors`` is loaded through the job's adapter section (built,
attached, ``load``); ``model.safetensors`` (the backbone in the model's export layout) through the
model's optional ``load_exported(tensors)`` when it has one, else by key: directly when the keys are
the backbone's own, or by the one-to-one renaming ``export_state_dict`` reveals.

Extra ``--adapter FILE[:strength]`` files are applied with the adapter component's
``from_file(model, path, strength)`` when it offers one (diffcore-lora does: ranks and kinds come
from the file), else by building the component, ``attach`` and ``load``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import attrs

from diffcore.errors import UserError

SAMPLERS_HELP = (
    "a registered sampler (`diffcore plugins` lists them): ddpm, ddim, euler, euler_a, heun, dpmpp_2m, "
    "dpmpp_2m_karras... (flow models: euler = flow Euler)"
)


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``diffcore sample``."""
    src = parser.add_argument_group("what to sample from (one of)")
    src.add_argument(
        "--model", metavar="TYPE", help="a model type (see `diffcore plugins`), with --pretrained"
    )
    src.add_argument(
        "--pretrained", metavar="PATH", help="diffusers folder or single-file checkpoint for --model"
    )
    src.add_argument(
        "--model-option",
        dest="model_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another model config key for --model (repeatable)",
    )
    src.add_argument("--job", metavar="JOB.yaml", help="a job file; samples its output_dir's weights")
    src.add_argument("--from", dest="from_dir", metavar="OUTPUT_DIR", help="a job's output directory")
    src.add_argument(
        "--checkpoint",
        default="final",
        metavar="final|step-N|latest",
        help="which weights of the job's output (default final)",
    )
    src.add_argument(
        "--weights",
        choices=["ema", "raw"],
        default=None,
        help="the job's EMA weights (ema.safetensors) or the trained weights as they are (default: ema when the run has one)",
    )
    gen = parser.add_argument_group("what to generate")
    gen.add_argument(
        "--prompt", dest="prompts", action="append", default=[], metavar="TEXT", help="a caption (repeatable)"
    )
    gen.add_argument(
        "--label",
        dest="labels",
        action="append",
        type=int,
        default=[],
        metavar="N",
        help="a class (repeatable)",
    )
    gen.add_argument(
        "--input",
        dest="inputs",
        action="append",
        default=[],
        metavar="KEY=IMAGE",
        help="an extra input the job's method samples with, e.g. control=edges.png (repeatable)",
    )
    gen.add_argument(
        "--reference",
        dest="references",
        action="append",
        default=[],
        metavar="IMAGE",
        help="a reference image to edit from (Kontext; repeatable for multi-reference models); with --mask "
        "the first one is the image to inpaint",
    )
    gen.add_argument(
        "--mask", default=None, metavar="IMAGE", help="inpainting mask of the first --reference (white = repaint)"
    )
    gen.add_argument(
        "--controlnet",
        default=None,
        metavar="DIR",
        help="a diffusers ControlNet folder to steer the model with (needs diffcore-controlnet), with --control",
    )
    gen.add_argument("--control", default=None, metavar="IMAGE", help="the control image (same as --input control=IMAGE)")
    gen.add_argument(
        "--controlnet-scale", type=float, default=1.0, help="multiplies the ControlNet's residuals (default 1)"
    )
    gen.add_argument("--count", type=int, default=1, help="images per prompt or label (default 1)")
    gen.add_argument("--steps", type=int, default=30, help="sampling steps (default 30)")
    gen.add_argument("--sampler", default="euler", help=SAMPLERS_HELP)
    gen.add_argument(
        "--sampler-option",
        dest="sampler_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a sampler config key, e.g. clip_x0=1 or dynamic_threshold=0.995 (repeatable)",
    )
    gen.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance scale (default 4.0, or the model's own for distilled guidance; 1 turns CFG off)",
    )
    gen.add_argument("--guidance-rescale", type=float, default=0.0, help="CFG rescale in [0, 1] (default 0)")
    gen.add_argument("--eta", type=float, default=0.0, help="DDIM noise (default 0)")
    gen.add_argument("--seed", type=int, default=0, help="seed; one seed gives the same images (default 0)")
    gen.add_argument(
        "--height", type=int, default=None, help="pixels (default: the job's resolution, else 512)"
    )
    gen.add_argument("--width", type=int, default=None, help="pixels (default: the height)")
    gen.add_argument("--batch-size", type=int, default=4, help="images generated at once (default 4)")
    gen.add_argument(
        "--scheduler", default=None, metavar="TYPE", help="override the scheduler type (ddpm, flow)"
    )
    out = parser.add_argument_group("where")
    out.add_argument(
        "--out", default=None, metavar="DIR", help="output folder (default: OUTPUT_DIR/samples/cli)"
    )
    out.add_argument(
        "--adapter",
        dest="adapters",
        action="append",
        default=[],
        metavar="FILE[:STRENGTH]",
        help="apply a saved adapter (repeatable)",
    )
    out.add_argument(
        "--adapter-type", default="lora", help="adapter component that reads --adapter files (lora)"
    )
    out.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default)")
    out.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="backbone dtype"
    )
    out.add_argument("--no-grid", action="store_true", help="do not write grid.png")
    out.add_argument(
        "--blocks-to-swap",
        type=int,
        default=0,
        metavar="N",
        help="keep the frozen weights of the backbone's last N repeated blocks in host memory and copy "
        "each to the device just before it runs (less device memory, same images; default 0)",
    )
    out.add_argument(
        "--compile",
        choices=["blocks", "full"],
        default=None,
        help="torch.compile the backbone: each repeated block class once (blocks) or its whole forward (full)",
    )


def _parse_adapter(spec: str) -> tuple[Path, float]:
    # a Windows drive letter or a path with ':' keeps its colon unless the tail is a number
    match = re.match(r"^(.*):([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)$", spec)
    path, strength = (match.group(1), float(match.group(2))) if match else (spec, 1.0)
    if not Path(path).is_file():
        raise UserError(
            f"adapter file {path!r} not found", where="--adapter", hint="give FILE or FILE:STRENGTH"
        )
    return Path(path), strength


def _parse_input(text: str) -> tuple[str, str]:
    key, sep, path = text.partition("=")
    if not sep or not key.strip() or not path:
        raise UserError(f"expected KEY=IMAGE, got {text!r}", where="--input", hint="e.g. --input control=edges.png")
    if not Path(path).is_file():
        raise UserError(f"image {path!r} not found", where=f"--input {key.strip()}")
    return key.strip(), path


def _yaml_value(text: str, where: str) -> Any:
    """A ``KEY=VALUE`` value parsed as YAML (bounded: no alias bombs)."""
    import yaml

    from diffcore.config.yaml_bounded import YAMLTooLarge, load_yaml

    try:
        return load_yaml(text)
    except YAMLTooLarge as exc:
        raise UserError(str(exc), where=where) from None
    except yaml.YAMLError as exc:
        raise UserError(f"invalid value: {getattr(exc, 'problem', None) or exc}", where=where) from None


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UserError(f"expected KEY=VALUE, got {text!r}", where="--model-option")
    return key.strip(), _yaml_value(value, f"--model-option {key.strip()}")


def _check_args(args: argparse.Namespace) -> None:
    sources = [name for name in ("model", "job", "from_dir") if getattr(args, name)]
    if len(sources) != 1:
        raise UserError(
            "give exactly one of --model TYPE, --job JOB.yaml or --from OUTPUT_DIR"
            + (f" (got {', '.join('--' + s.replace('_dir', '') for s in sources)})" if sources else ""),
            where="diffcore sample",
        )
    if args.pretrained and not args.model:
        raise UserError("--pretrained goes with --model TYPE", where="--pretrained")
    if not args.prompts and not args.labels:
        raise UserError(
            "nothing to generate", where="diffcore sample", hint="give --prompt TEXT or --label N"
        )
    if args.prompts and args.labels and len(args.prompts) != len(args.labels):
        raise UserError(
            f"{len(args.prompts)} prompts but {len(args.labels)} labels",
            where="--label",
            hint="give one label per prompt, or only one of the two",
        )
    for name in ("count", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(
                f"must be at least 1, got {getattr(args, name)}", where=f"--{name.replace('_', '-')}"
            )
    for path in [*args.references, *([args.mask] if args.mask else [])]:
        if not Path(path).is_file():
            raise UserError(f"image {path!r} not found", where="--mask" if path == args.mask else "--reference")
    if not 0.0 <= args.guidance_rescale <= 1.0:
        raise UserError(f"must be in [0, 1], got {args.guidance_rescale}", where="--guidance-rescale")
    if args.controlnet is not None and not Path(args.controlnet).is_dir():
        raise UserError(f"no such folder {args.controlnet!r}", where="--controlnet", hint="give a diffusers ControlNet folder")
    if args.control is not None and not Path(args.control).is_file():
        raise UserError(f"image {args.control!r} not found", where="--control")


def _check_labels(labels: list[int], model: Any) -> None:
    """Labels name a class the model has: 0 .. null_label - 1 (the null label is the "no class" one)."""
    if not labels:
        return
    classes = model.null_label
    if classes is None:
        raise UserError("this model takes no class labels", where="--label", hint="give --prompt TEXT instead")
    bad = [label for label in labels if not 0 <= label < classes]
    if bad:
        raise UserError(
            f"label {bad[0]} is out of range: the model has {classes} classes", where="--label",
            hint=f"give a label from 0 to {classes - 1}",
        )


def _sampler_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for text in args.sampler_options:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise UserError(f"expected KEY=VALUE, got {text!r}", where="--sampler-option")
        options[key.strip()] = _yaml_value(value, f"--sampler-option {key.strip()}")
    return options


def _weights_dir(output_dir: Path, checkpoint: str) -> Path:
    if checkpoint == "final":
        folder = output_dir / "final"
    elif checkpoint == "latest":
        steps = sorted(
            (int(p.name[5:]), p) for p in (output_dir / "checkpoints").glob("step-*") if p.name[5:].isdigit()
        )
        if not steps:
            raise UserError("no checkpoints yet", where=str(output_dir / "checkpoints"))
        folder = steps[-1][1]
    else:
        name = checkpoint if checkpoint.startswith("step-") else f"step-{checkpoint}"
        folder = output_dir / "checkpoints" / name
    if not folder.is_dir():
        have = sorted(p.name for p in (output_dir / "checkpoints").glob("step-*"))
        have = (["final"] if (output_dir / "final").is_dir() else []) + have
        raise UserError(
            f"no weights folder {folder}",
            where="--checkpoint",
            hint=f"available: {', '.join(have)}" if have else "has the job saved anything yet?",
        )
    return folder


def _ema_files(folder: Path) -> list[Path]:
    """The EMA weights exported in ``folder`` (``ema.safetensors``, ``ema-<module>.safetensors``);
    an older run's ``ema.safetensors`` in the EMA's own layout does not count."""
    from diffcore.training.ema import is_ema_export

    return [p for p in sorted(folder.glob("ema*.safetensors")) if p.name != "ema-state.safetensors" and is_ema_export(p)]


def _choose_weights(folder: Path, asked: str | None) -> str:
    """"ema" or "raw": what ``--weights`` asks for, by default the EMA when ``folder`` has one."""
    if asked == "raw":
        return "raw"
    if _ema_files(folder):
        return "ema"
    if asked == "ema":
        old = (folder / "ema.safetensors").is_file()
        raise UserError(
            "this run's ema.safetensors is in the EMA's own layout (written before diffcore exported it)"
            if old
            else "no EMA weights here (the job had no train.ema_decay)",
            where="--weights",
            hint="use --weights raw" + (", or export it with `diffcore run JOB --resume` (a finished run just re-exports)" if old else ""),
        )
    return "raw"


def _load_weights(model: Any, modules: dict[str, Any], folder: Path, weights: str = "raw", *, adapter: bool = False) -> None:
    """The trained weights of a run's output folder (``final/`` or a checkpoint) into ``model`` and
    the method's modules: the backbone through the model's ``load_exported``, each method module
    from ``<name>.safetensors``; with ``weights="ema"`` the EMA's files in their place where they exist
    (``ema.safetensors`` is the backbone's unless the run trained an ``adapter``)."""
    from safetensors.torch import load_file

    from diffcore.weights import load_into

    def pick(name: str) -> Path:
        ema = folder / f"ema{'' if name == 'model' else '-' + name}.safetensors"
        own = folder / f"{name}.safetensors"
        return ema if weights == "ema" and ema.is_file() and not (adapter and name == "model") else own

    backbone = pick("model")
    if backbone.is_file():
        model.load_exported(load_file(str(backbone)), where=str(backbone))
    for name, module in modules.items():
        file = pick(name)
        if not file.is_file():
            raise UserError(
                f"the method's module {name!r} has no {file.name} here",
                where=str(folder),
                hint="sample from the folder of the run that trained it",
            )
        load_into(module, load_file(str(file)), where=str(file), device=model.device)


def _apply_adapter_file(model: Any, adapter_type: str, path: Path, strength: float) -> Any:
    from diffcore.api import build_component

    adapter = build_component("adapter", adapter_type, {})
    return adapter.from_file(model, path, strength)


def _device(name: str):
    import torch

    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@attrs.frozen
class Loaded:
    """What ``diffcore sample`` generates with: the model (trained weights in), its scheduler, the
    job's method and the method's modules (None and {} without a job), where the run wrote, and the
    job's resolution."""

    model: Any
    scheduler: Any
    method: Any
    modules: dict[str, Any]
    output_dir: Path | None
    resolution: int | None
    #: the job's weights loaded: "ema" or "raw" (None without a job)
    weights: str | None = None


def load_for_sampling(args: argparse.Namespace) -> Loaded:
    """Everything ``diffcore sample`` needs for the parsed options."""
    from diffcore.api import build_component, build_model, component_config

    job = None
    output_dir = None
    if args.from_dir:
        output_dir = Path(args.from_dir)
        job_file = output_dir / "job.yaml"
        if not job_file.is_file():
            raise UserError(f"no job.yaml in {output_dir}", where="--from", hint="give a job's output_dir")
        from diffcore.config.job import load_job

        job = load_job(job_file)
    elif args.job:
        from diffcore.config.job import load_job

        job = load_job(args.job)
        output_dir = Path(job.output_dir)
    resolution = None
    if job is not None:
        # the base the job trained on: its model.quantize applies here too
        model = build_model(job.model.type, job.model.config, quantize=job.model.quantize)
        res = getattr(job.data.config, "resolution", None)
        resolution = int(res) if isinstance(res, int) else None
        sched_type, sched_options = (
            (job.scheduler.type, job.scheduler.config) if job.scheduler is not None else (None, None)
        )
    else:
        options = dict(_parse_option(o) for o in args.model_options)
        if args.pretrained:
            if not Path(args.pretrained).exists():
                raise UserError(f"{args.pretrained} does not exist", where="--pretrained")
            options["pretrained"] = str(args.pretrained)
        model = build_component(
            "model", args.model, component_config("model", args.model, options, where="--model")
        )
        sched_type, sched_options = None, None
    if sched_type is None or args.scheduler:
        # the model's default scheduler (what training used when the job named none), or --scheduler
        default = dict(model.default_scheduler)
        default_type = default.pop("type", "ddpm")
        sched_type = args.scheduler or default_type
        options = default if sched_type == default_type else {}
        sched_options = component_config("scheduler", sched_type, options, where="--scheduler")
    scheduler = build_component("scheduler", sched_type, sched_options)

    method = None
    modules: dict[str, Any] = {}
    weights = None
    if job is None and getattr(args, "weights", None):
        raise UserError("--weights chooses among a job's weights", where="--weights", hint="use it with --job or --from")
    if job is not None:
        method = build_component("method", job.method.type, job.method.config)
        assert output_dir is not None  # set wherever the job is
        folder = _weights_dir(output_dir, args.checkpoint)
        weights = _choose_weights(folder, getattr(args, "weights", None))
        adapter_file = folder / "adapter.safetensors"
        if adapter_file.is_file():
            if job.adapter is None:
                raise UserError(
                    "the weights are an adapter but the job has no adapter section", where=str(folder)
                )
            adapter = build_component("adapter", job.adapter.type, job.adapter.config)
            adapter.attach(model)
            ema_adapter = folder / "ema.safetensors"
            adapter.load(ema_adapter if weights == "ema" and ema_adapter.is_file() else adapter_file)
        modules = method.modules(model)
        if not adapter_file.is_file() and not (folder / "model.safetensors").is_file() and not modules:
            raise UserError("neither model.safetensors nor adapter.safetensors here", where=str(folder))
        _load_weights(model, modules, folder, weights, adapter=adapter_file.is_file())
    if args.controlnet is not None:
        if modules:
            raise UserError(
                f"the job's method already owns {', '.join(modules)}; --controlnet steers a model sampled plainly",
                where="--controlnet",
            )
        options = {"pretrained": str(args.controlnet), "conditioning_scale": args.controlnet_scale}
        method = build_component("method", "controlnet", component_config("method", "controlnet", options, where="--controlnet"))
        modules = method.modules(model)
    for spec in args.adapters:
        path, strength = _parse_adapter(spec)
        _apply_adapter_file(model, args.adapter_type, path, strength)
    return Loaded(model, scheduler, method, modules, output_dir, resolution, weights)


def sample_command(args: argparse.Namespace) -> int:
    """Run ``diffcore sample``: write PNGs (and grid.png) and print where."""
    _check_args(args)
    import torch

    from diffcore.sampling import build_sampler, generate, image_grid, sample_name, save_png

    sampler = build_sampler(args.sampler, _sampler_options(args), eta=args.eta, where="--sampler")
    loaded = load_for_sampling(args)
    model, scheduler, method, output_dir = loaded.model, loaded.scheduler, loaded.method, loaded.output_dir
    device = _device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        args.dtype or ""
    )
    if getattr(args, "blocks_to_swap", 0):
        from diffcore.training.block_swap import swap_for_sampling

        swap_for_sampling(model, args.blocks_to_swap, device, dtype)
    model.to(device, dtype)
    for module in loaded.modules.values():
        module.to(device=device, dtype=dtype).eval()
    if getattr(args, "compile", None):
        from diffcore.training.compile import compile_backbone

        compile_backbone(model, args.compile)
    height = args.height or loaded.resolution or 512
    width = args.width or height
    inputs = dict(_parse_input(spec) for spec in args.inputs)
    if args.control is not None:
        inputs["control"] = args.control
    needed = tuple(method.inference_inputs) if method is not None else ()
    missing = [key for key in needed if key not in inputs]
    if missing:
        raise UserError(
            f"the {type(method).__name__} method needs {', '.join(missing)} to sample",
            where="--input",
            hint=" ".join(f"--input {key}=IMAGE" for key in missing),
        )

    _check_labels(args.labels, model)
    n = max(len(args.prompts), len(args.labels))
    entries = [(i, j) for i in range(n) for j in range(args.count)]
    # an image's seed is --seed plus its index: the same image whatever --batch-size
    seeds = [args.seed + k for k in range(len(entries))]
    out_dir = (
        Path(args.out) if args.out else (output_dir / "samples" / "cli" if output_dir else Path("samples"))
    )
    guidance = args.guidance
    if guidance is None:  # distilled-guidance models keep their own default
        guidance = None if model.guidance_embedded else 4.0
    images = []
    for start in range(0, len(entries), args.batch_size):
        chunk = entries[start : start + args.batch_size]
        batch: dict[str, Any] = {}
        if args.prompts:
            batch["captions"] = [args.prompts[i] for i, _ in chunk]
        if args.labels:
            batch["labels"] = torch.tensor([args.labels[i] for i, _ in chunk], device=device)
        if inputs:
            from diffcore.inputs import load_inputs

            batch.update(load_inputs(inputs, count=len(chunk), height=height, width=width, device=device))
        if args.references or args.mask:
            from diffcore.inputs import load_edit_inputs

            batch.update(
                load_edit_inputs(
                    args.references, args.mask, count=len(chunk), height=height, width=width, device=device
                )
            )
        try:
            pixels = generate(
                model,
                scheduler,
                batch=batch,
                height=height,
                width=width,
                steps=args.steps,
                sampler=sampler,
                guidance=guidance,
                guidance_rescale=args.guidance_rescale,
                seed=seeds[start : start + len(chunk)],
                method=method,
            )
        except ValueError as exc:
            raise UserError(str(exc), where="diffcore sample") from None
        images.append(pixels.cpu())
    pixels = torch.cat(images)
    names, texts = [], []
    for k, (i, _) in enumerate(entries):
        label = args.labels[i] if args.labels else None
        prompt = args.prompts[i] if args.prompts else None
        names.append(sample_name(k, seeds[k], label=label, prompt=prompt))
        texts.append({"prompt": prompt, "label": label, "seed": seeds[k], "sampler": args.sampler,
                      "steps": args.steps, "guidance": guidance, "size": f"{width}x{height}"})
    paths = save_png(pixels, out_dir, names=names, texts=texts)
    if not args.no_grid:
        image_grid(pixels, columns=args.count if args.count > 1 else None).save(out_dir / "grid.png")
    used = f" ({loaded.weights} weights)" if loaded.weights else ""
    print(f"diffcore sample: {len(paths)} images in {out_dir}{used}", flush=True)
    return 0
