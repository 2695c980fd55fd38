"""``diffcore convert``: adapter files between the kohya and PEFT formats, model files between the
diffusers folder and the original single file, and ``--merge`` to fold an adapter into a model.

What a file is comes from explicit detection (:mod:`diffcore.layouts`): every installed model and
adapter says whether it recognises the file's tensor names, and in which layout. The conversion goes
through the plugins' own code: a model is loaded (``diffcore.load_model``) and written with
``save_pretrained(path, layout)``; an adapter is applied to its base model with the adapter
component's ``from_file`` and written with ``save(path, fmt)``, so the names are exactly the ones
training writes and reads. The output is written beside its final place and renamed when complete;
the input is never overwritten.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffcore.errors import UserError

if TYPE_CHECKING:
    from diffcore.layouts import Detection, LayoutProbe

MODEL_LAYOUTS = {"original": "original", "single": "original", "diffusers": "diffusers", "folder": "diffusers"}
# header entries the adapter writes itself; everything else in the input's header is carried over
_OWN_METADATA = ("diffcore.", "lora_adapter_metadata", "ss_network_")
_MODEL_FOLDER = ("model_index.json", "config.json")


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``diffcore convert``."""
    parser.add_argument("input", help="an adapter .safetensors file, or a model's diffusers folder or single file")
    parser.add_argument("-o", "--output", required=True, help="where to write (a .safetensors file or a folder)")
    parser.add_argument(
        "--to",
        metavar="LAYOUT",
        help="adapters: kohya or peft; models: original (single) or diffusers (folder); default: the other one "
        "(with --merge: the input's)",
    )
    parser.add_argument("--model", metavar="TYPE", help="the architecture, when detection cannot tell (sd15 vs sd21...)")
    parser.add_argument(
        "--base",
        metavar="PATH",
        help="adapters: the base model the adapter was trained on (default: the one its header names, if present)",
    )
    parser.add_argument(
        "--merge",
        metavar="ADAPTER[:STRENGTH]",
        help="fold this adapter file into the input model (strength default 1) and write the merged model",
    )
    parser.add_argument(
        "--model-option",
        dest="model_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another model config key, e.g. tokenizer=DIR for an SDXL single file, autoencoder=false (repeatable)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing output (never the input)")


def convert_command(args: argparse.Namespace) -> int:
    from diffcore.layouts import describe, detect, probe

    source = Path(args.input)
    output = Path(args.output)
    found = probe(source)
    _check_output(output, [source, *([Path(args.base)] if args.base else [])], args.force)
    claims = detect(found)
    adapters = [c for c in claims if c.kind == "adapter"]
    models = [c for c in claims if c.kind == "model"]
    if adapters:
        if args.merge:
            raise UserError(
                f"{source} is an adapter file ({adapters[0].layout}); --merge folds an adapter into a model",
                where="--merge",
                hint=f"diffcore convert BASE_MODEL --merge {source} -o MERGED",
            )
        written = _convert_adapter(args, source, output, adapters[0], found)
        print(f"{source} ({adapters[0].layout}) -> {written}")
        return 0
    if args.model:
        layouts = {c.layout for c in models if c.name == args.model}
        _model_known(args.model)
        layout = layouts.pop() if layouts else None
        name = args.model
    elif len(models) == 1:
        name, layout = models[0].name, models[0].layout
    elif models:
        raise UserError(
            f"{source} looks like several architectures: "
            + ", ".join(f"{c.name} ({c.layout})" for c in models),
            where=str(source),
            hint="name it with --model " + models[0].name,
        )
    else:
        raise UserError(
            f"unknown layout: {describe(found)}; no installed model or adapter recognises it",
            where=str(source),
            hint="models that detect their files: " + (", ".join(_detecting("model")) or "none")
            + "; for another installed model give --model TYPE and --to original|diffusers",
        )
    target = _model_target(args.to, layout, bool(args.merge), source)
    written = _convert_model(args, source, output, name, target, found.dtype)
    merged = f" with {args.merge} merged" if args.merge else ""
    print(f"{source} ({name}, {layout or 'layout not detected'}){merged} -> {written} ({target})")
    return 0


# -- checks ----------------------------------------------------------------------------------------
def _same_or_inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents or a in b.parents


def _check_output(output: Path, inputs: list[Path], force: bool) -> None:
    for given in inputs:
        if _same_or_inside(output, given):
            raise UserError(
                f"the output {output} is (or holds, or lies inside) the input {given}; convert never overwrites its input",
                where="--output",
                hint="write somewhere else",
            )
    if output.exists() and not force:
        raise UserError(f"{output} already exists", where="--output", hint="pick a new path or pass --force")
    # --force replaces a file or a model folder, never a folder of other things (-o ~/models)
    if output.is_dir() and any(output.iterdir()) and not any((output / n).is_file() for n in _MODEL_FOLDER):
        raise UserError(
            f"{output} is a folder that is not a model folder (no model_index.json or config.json)",
            where="--output",
            hint="--force replaces only a file or a model folder; give a new path",
        )


def _model_known(name: str) -> None:
    from diffcore.registry import get_registry

    get_registry().get("model", name, where="--model")


def _detecting(kind: str) -> list[str]:
    from diffcore.registry import get_registry

    registry = get_registry()
    return [n for n in registry.names(kind) if registry.components[kind][n].spec.detect is not None]


def _model_target(to: str | None, layout: str | None, merge: bool, source: Path) -> str:
    if to is not None:
        if to not in MODEL_LAYOUTS:
            raise UserError(
                f"unknown model layout {to!r}", where="--to", hint="original (single file) or diffusers (folder)"
            )
        return MODEL_LAYOUTS[to]
    if layout is None:
        raise UserError(
            f"the layout of {source} was not detected, so the other one is unknown",
            where="--to",
            hint="say which to write: --to original or --to diffusers",
        )
    if merge:
        return layout
    return "diffusers" if layout == "original" else "original"


def _model_options(args: argparse.Namespace, name: str, dtype: str | None) -> dict[str, Any]:
    import attrs

    from diffcore.commands.sample import _parse_option
    from diffcore.registry import get_registry

    options = dict(_parse_option(text) for text in args.model_options)
    config = get_registry().get("model", name).spec.config
    # keep the file's precision (a float16 file stays float16, bit for bit) unless told otherwise
    if dtype is not None and "dtype" not in options and "dtype" in attrs.fields_dict(config):
        options["dtype"] = dtype
    return options


# -- writing ---------------------------------------------------------------------------------------
def _staging(output: Path) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    return output.parent / f".{output.name}.converting-{os.getpid()}{output.suffix}"


def _publish(staged: Path, output: Path) -> Path:
    if output.is_dir():
        shutil.rmtree(output)
    elif output.exists():
        output.unlink()
    os.replace(staged, output)
    return output


def _discard(staged: Path) -> None:
    if staged.is_dir():
        shutil.rmtree(staged, ignore_errors=True)
    elif staged.exists():
        staged.unlink()


def _convert_model(
    args: argparse.Namespace, source: Path, output: Path, name: str, target: str, dtype: str | None
) -> Path:
    if target == "original" and output.suffix != ".safetensors":
        raise UserError(
            f"the original layout is one file: {output} does not end in .safetensors",
            where="--output",
            hint=f"e.g. -o {output}.safetensors, or --to diffusers for a folder",
        )
    if target == "diffusers" and output.suffix == ".safetensors":
        raise UserError(
            f"the diffusers layout is a folder: {output} ends in .safetensors",
            where="--output",
            hint="give a folder path, or --to original for one file",
        )
    import diffcore

    merge = _parse_merge(args.merge) if args.merge else None
    if merge is not None:
        _check_output(output, [merge[0]], force=True)
    model = diffcore.load_model(name, pretrained=str(source), **_model_options(args, name, dtype))
    if merge is not None:
        applied = _applied(model, merge[0], merge[1], "--merge")
        applied.merge()
        applied.detach()  # the merged weights stay; the adapter's own modules go
    staged = _staging(output)
    try:
        model.save_pretrained(staged, target)
        return _publish(staged, output)
    finally:
        _discard(staged)


def _parse_merge(spec: str) -> tuple[Path, float]:
    # FILE or FILE:STRENGTH; a path with a colon keeps it unless the tail is a number
    match = re.match(r"^(.*):([-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)$", spec)
    path, strength = (match.group(1), float(match.group(2))) if match else (spec, 1.0)
    if not Path(path).is_file():
        raise UserError(f"adapter file {path!r} not found", where="--merge", hint="give FILE or FILE:STRENGTH")
    return Path(path), strength


def _applied(model: Any, path: Path, strength: float, where: str, adapter_type: str | None = None) -> Any:
    """The adapter file at ``path`` on ``model`` (through the adapter component that reads it)."""
    from diffcore.api import build_component
    from diffcore.layouts import describe, detect, probe

    if adapter_type is None:
        found = probe(path)
        claims = [c for c in detect(found) if c.kind == "adapter"]
        if not claims:
            raise UserError(
                f"not an adapter file any installed adapter reads: {describe(found)}",
                where=where,
                hint="adapters that convert: " + (", ".join(_detecting("adapter")) or "none (pip install diffcore-lora)"),
            )
        adapter_type = claims[0].name
    return build_component("adapter", adapter_type, {}).from_file(model, path, strength)


def _convert_adapter(args: argparse.Namespace, source: Path, output: Path, claim: Detection, found: LayoutProbe) -> Path:
    import diffcore
    from diffcore.layouts import detect, probe

    metadata = found.metadata

    if output.suffix != ".safetensors":
        raise UserError(f"{output} does not end in .safetensors", where="--output", hint="adapters are one file")
    base = args.base or metadata.get("diffcore.base_model") or None
    if base is None or not Path(base).exists():
        said = f" (its header names {base}, which is not here)" if base else ""
        raise UserError(
            f"converting an adapter needs the base model it was trained on{said}: the layer names come from it",
            where="--base",
            hint="--base PATH (a diffusers folder or single file of that model)",
        )
    name = args.model
    if name is None:
        models = [c.name for c in detect(probe(base)) if c.kind == "model"]
        stated = metadata.get("diffcore.architecture")
        if stated in models or (not models and stated):
            name = stated
        elif len(models) == 1:
            name = models[0]
        else:
            raise UserError(
                f"cannot tell the architecture of {base}" + (f": it could be {', '.join(models)}" if models else ""),
                where="--base",
                hint="name it with --model TYPE",
            )
    _model_known(name)
    target = args.to or ("peft" if claim.layout == "kohya" else "kohya")
    # the adapter's tensors take the dtype of the layers they sit on: load the base in the adapter's
    # precision so they are written back bit for bit (the base's own weights are not written)
    model = diffcore.load_model(name, pretrained=str(base), **_model_options(args, name, found.dtype))
    applied = _applied(model, source, 1.0, str(source), claim.name)
    carried = {k: v for k, v in metadata.items() if not k.startswith(_OWN_METADATA)}
    staged = _staging(output)
    try:
        applied.save(staged, target, metadata=carried)
        return _publish(staged, output)
    finally:
        _discard(staged)
