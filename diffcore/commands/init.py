"""``diffcore init``: write a commented job file for a model and a method.

``diffcore init --model sdxl --method lora --data ./images --resolution 1024 --rank 16 -o job.yaml``
writes a job that ``diffcore validate`` accepts, with comments on what the user must point at (the
model files, the images). Given flags, it asks nothing; on a terminal it asks for what is missing.
Known architectures (dit, sd15, sd21, sdxl, flux, flux2, sd3, sd35) get their usual settings; any other
installed model gets its ``type`` and, when its config has one, ``pretrained``. The text is checked
with the job loader before it is written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from diffcore.errors import UserError

#: "full" trains the whole backbone; an adapter name trains that adapter (method "diffusion" both ways)
FULL = "full"
_IMAGES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@attrs.frozen
class Preset:
    """What a known architecture's job usually says."""

    resolution: int
    #: the comment over ``pretrained``: what to point it at
    pretrained: str
    #: further model keys: (key, value, comment)
    model: tuple[tuple[str, Any, str], ...] = ()
    prompts: bool = True
    guidance: float = 5.0
    bf16: bool = True
    method: str = "lora"


_SD_SINGLE = "with a single file also set tokenizer: (and tokenizer_2: for SDXL) to a folder holding it"
PRESETS: dict[str, Preset] = {
    "dit": Preset(
        32,
        "optional: a DiT checkpoint to start from (DiTTransformer2DModel folder or facebookresearch/DiT "
        ".safetensors); leave it out to train from scratch",
        model=(
            ("size", "S/4", "S, B, L or XL with patch 2, 4 or 8 (hidden_size/depth/num_heads/patch_size instead)"),
            ("in_channels", 3, "pixel space (RGB); set autoencoder: sd for latents"),
            ("prediction_type", "flow", "rectified flow, with the flow scheduler below"),
        ),
        prompts=False,
        guidance=3.0,
        bf16=False,
        method=FULL,
    ),
    "sd15": Preset(512, "a Stable Diffusion 1.x diffusers pipeline folder or its single .safetensors file; " + _SD_SINGLE),
    "sd21": Preset(
        768,
        "a Stable Diffusion 2.x diffusers pipeline folder or its single .safetensors file; " + _SD_SINGLE,
        model=(("prediction_type", "v", "SD 2.x 768 px models predict v; the 512 px base predicts eps"),),
    ),
    "sdxl": Preset(
        1024, "an SDXL base diffusers pipeline folder or sd_xl_base_1.0.safetensors; " + _SD_SINGLE, guidance=6.0
    ),
    "flux": Preset(
        1024,
        "a FLUX.1 diffusers folder (transformer/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, vae/) "
        "or flux1-dev.safetensors plus text_encoder:, text_encoder_2:, tokenizer:, tokenizer_2: and vae: paths",
        model=(
            ("variant", "dev", "schnell: no guidance embedding"),
            ("guidance", 1.0, "the distilled guidance passed while training"),
        ),
        guidance=3.5,
    ),
    "flux2": Preset(
        1024,
        "a FLUX.2 diffusers folder, or the transformer's single file plus text_encoder:, tokenizer: and vae: paths",
        model=(("variant", "klein-4b", "dev, klein-4b or klein-9b: must match the weights"),),
        guidance=4.0,
    ),
    "sd3": Preset(1024, "an SD3 medium diffusers pipeline folder or its single .safetensors file", guidance=5.0),
    "sd35": Preset(
        1024,
        "an SD3.5 diffusers pipeline folder or its single .safetensors file",
        model=(("variant", "large", "large or medium: must match the weights"),),
        guidance=4.5,
    ),
}


def add_init_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``diffcore init``."""
    parser.add_argument("-o", "--output", default="job.yaml", help="the job file to write (default job.yaml)")
    parser.add_argument("--model", metavar="TYPE", help="a model type (`diffcore plugins` lists them): dit, sdxl, flux...")
    parser.add_argument(
        "--method",
        metavar="NAME",
        help="full (train the whole backbone) or an adapter: lora, dora, lokr, loha (default: lora, full for dit)",
    )
    parser.add_argument("--pretrained", metavar="PATH", help="the model files (a diffusers folder or a single file)")
    parser.add_argument("--data", metavar="DIR", help="the training images (captions in same-name .txt files)")
    parser.add_argument("--resolution", type=int, help="training side in pixels (default: the model's usual)")
    parser.add_argument("--rank", type=int, help="adapter rank (default 16)")
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    parser.add_argument("--output-dir", metavar="DIR", help="where the run writes (default runs/<name>)")
    parser.add_argument("--force", action="store_true", help="replace an existing job file")


def init_command(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.exists() and not args.force:
        raise UserError(f"{output} already exists", where="--output", hint="pick another name or pass --force")
    ask = _asker(sys.stdin.isatty())
    from diffcore.registry import get_registry

    registry = get_registry()
    models = registry.names("model")
    adapters = registry.names("adapter")
    model = args.model or ask("--model", "model type", ", ".join(models), None)
    registry.get("model", model, where="--model")
    preset = PRESETS.get(model)
    method = args.method or (preset.method if preset else "lora")
    if method != FULL and method not in adapters:
        raise UserError(
            f"unknown method {method!r}",
            where="--method",
            hint="full, or an installed adapter: " + (", ".join(adapters) or "none (pip install diffcore-lora)"),
        )
    config = registry.get("model", model).spec.config
    fields = attrs.fields_dict(config)
    pretrained = args.pretrained
    if pretrained is None and "pretrained" in fields and (preset is None or model != "dit"):
        pretrained = ask("--pretrained", "model files (diffusers folder or single file)", None, "/path/to/model")
    data = args.data or ask("--data", "folder of training images", None, "./images")
    resolution = args.resolution or _number(
        ask("--resolution", "training resolution in pixels", None, str(preset.resolution if preset else 512)),
        "--resolution",
    )
    rank = args.rank or (_number(ask("--rank", "adapter rank", None, "16"), "--rank") if method != FULL else 16)
    text = render(
        model=model,
        method=method,
        pretrained=pretrained,
        data=data,
        resolution=resolution,
        rank=rank,
        steps=args.steps,
        output_dir=args.output_dir,
        fields=set(fields),
        name=output.stem,
    )
    _check(text, output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(f"wrote {output} ({model}, {method}); check it with `diffcore validate {output}`, train with `diffcore run {output}`")
    return 0


def _asker(tty: bool) -> Callable[[str, str, str | None, str | None], str]:
    def ask(flag: str, what: str, choices: str | None, default: str | None) -> str:
        if not tty:
            if default is not None:
                return default
            raise UserError(f"no {what} given", where=flag, hint=f"pass {flag}" + (f" (one of {choices})" if choices else ""))
        shown = f" [{default}]" if default is not None else (f" ({choices})" if choices else "")
        answer = input(f"{what}{shown}: ").strip()
        if not answer and default is None:
            raise UserError(f"no {what} given", where=flag)
        return answer or str(default)

    return ask


def _number(text: str, flag: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise UserError(f"expected a positive whole number, got {text!r}", where=flag)
    return int(text)


def _value(value: Any) -> str:
    # JSON scalars are YAML scalars: strings come out quoted, so any path is read back as written
    return json.dumps(value)


def _line(key: str, value: Any, comment: str = "", indent: int = 2) -> str:
    text = f"{' ' * indent}{key}: {_value(value)}"
    return f"{text:<40}# {comment}" if comment else text


def _classes(data: str) -> int | None:
    """How many class folders ``data`` holds (the folder dataset's labels), when it exists."""
    folder = Path(data)
    if not folder.is_dir() or any(p.suffix.lower() in _IMAGES for p in folder.iterdir()):
        return None
    count = sum(1 for p in folder.iterdir() if p.is_dir())
    return count or None


def render(
    *,
    model: str,
    method: str,
    pretrained: str | None,
    data: str,
    resolution: int,
    rank: int,
    steps: int,
    output_dir: str | None,
    fields: set[str],
    name: str,
) -> str:
    """The commented job text."""
    preset = PRESETS.get(model)
    labelled = model == "dit"
    adapter = method != FULL
    bf16 = bool(preset.bf16) if preset else False
    lines = [
        f"# diffcore job: {model}, {'a ' + method + ' adapter' if adapter else 'full fine-tune'} (written by diffcore init).",
        "# Check it with `diffcore validate THIS.yaml`, train with `diffcore run THIS.yaml`;",
        "# any value can be changed on the command line: --set train.lr=5e-5",
        f"name: {_value(name)}",
        f"output_dir: {_value(output_dir or f'runs/{name}')}" + "   # checkpoints, samples, metrics.jsonl, final/",
        "seed: 0",
        "",
        "model:",
        _line("type", model),
    ]
    if "pretrained" in fields:
        note = preset.pretrained if preset else "the model files: a diffusers folder or a single .safetensors file"
        lines.append(f"  # POINT THIS AT YOUR FILES: {note}")
        if pretrained is not None:
            lines.append(_line("pretrained", pretrained))
        else:
            lines.append("  # pretrained: /path/to/model")
    for key, value, comment in preset.model if preset else ():
        if key in fields:
            lines.append(_line(key, value, comment))
    if labelled:
        classes = _classes(data)
        lines.append(_line("input_size", resolution, "the image side the positional grid is built for"))
        lines.append(
            _line(
                "num_classes",
                classes or 10,
                "counted from the class folders of data.path" if classes else "set to the number of class folders in data.path",
            )
        )
    elif "resolution" in fields:
        lines.append(_line("resolution", resolution, "the size the model is published at"))
    if bf16 and "dtype" in fields:
        lines.append(_line("dtype", "bfloat16", "frozen base weights in bf16 (half the memory of float32)"))
    if adapter:
        lines += [
            "",
            "adapter:",
            _line("type", method),
            _line("rank", rank, "capacity; 4-64 is usual"),
            _line("alpha", rank, "update scale alpha/rank = 1"),
            "  # targets default to the model's usual layers; saved in the kohya/ComfyUI format (save_format: peft for diffusers)",
        ]
    lines += [
        "",
        "method:",
        _line("type", "diffusion"),
    ]
    if labelled:
        lines.append(_line("condition_dropout", 0.1, "the null class, so sampling can use classifier-free guidance"))
    if model == "dit":
        lines += ["", "scheduler:", _line("type", "flow", "matches prediction_type: flow")]
    else:
        lines.append("# the scheduler defaults to the model's own")
    lines += [
        "",
        "data:",
        _line("type", "folder"),
        "  # POINT THIS AT YOUR IMAGES: "
        + (
            "one sub-folder per class (the sorted folder names are labels 0, 1, ...)"
            if labelled
            else "images with same-name .txt captions beside them"
        ),
        _line("path", data),
        _line("resolution", resolution, "images are resized (and bucketed by aspect ratio) to about this area"),
    ]
    if labelled:
        lines.append(_line("labels", "folders"))
        lines.append(_line("buckets", False, "square images"))
        lines.append(_line("bucket_step", 8 if resolution % 64 else 64, "sides are multiples of this"))
    else:
        lines.append(_line("buckets", True))
        lines.append(_line("caption_dropout", 0.05, "some empty captions, for classifier-free guidance"))
    lr = 1e-4 if adapter else (1e-3 if model == "dit" else 1e-5)
    lines += [
        "",
        "train:",
        _line("steps", steps),
        _line("batch_size", 32 if model == "dit" else 1),
        _line("lr", lr),
        _line("warmup_steps", 50),
    ]
    if bf16:
        lines.append(_line("mixed_precision", "bf16", "no on CPUs and GPUs without bf16"))
        lines.append(_line("gradient_checkpointing", True, "less memory, about 30% slower"))
    lines += [
        _line("checkpoint_every", 250, "diffcore run --resume continues from the newest"),
        _line("log_every", 10),
        "",
        "callbacks:",
        "  - type: sample",
        "    every: 250",
    ]
    if preset is None or preset.prompts:
        lines.append('    prompts: ["a photo of a dog on a beach"]   # what to draw while training')
    else:
        lines.append("    labels: [0, 1]   # classes to draw while training")
    lines += [
        _line("steps", 30, indent=4),
        _line("guidance", preset.guidance if preset else 5.0, indent=4),
        _line("height", resolution, indent=4),
        _line("width", resolution, indent=4),
    ]
    return "\n".join(lines) + "\n"


def _check(text: str, output: Path) -> None:
    """The job loader accepts the text (every section structured, unknown keys rejected)."""
    import tempfile

    from diffcore.config.job import load_job

    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / output.name
        file.write_text(text)
        load_job(str(file))
