"""Finding a component's weights in what a user hands in as ``pretrained``.

Three shapes are accepted:

* a diffusers **pipeline** folder: a ``model_index.json`` or a ``<component>/`` sub-folder (``unet``,
  ``transformer``, ``vae``, ...) beside the other components;
* a **component** folder: ``config.json`` with ``diffusion_pytorch_model.safetensors`` (or
  ``model.safetensors``), possibly sharded with an ``*.safetensors.index.json``; or a folder holding
  safetensors weights without a config;
* a single **file**: one ``.safetensors`` in the original layout (which keys it holds is the plugin's
  business).

:func:`locate` tells them apart and returns a :class:`Located`; its :meth:`~Located.checkpoint` opens
the weights as a :class:`diffcore.weights.Checkpoint` (which refuses anything but safetensors). A path
that does not exist, or a folder that holds none of these, is a :class:`UserError` saying where, what
was expected, and what to pass instead. Importing this module does not import torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import attrs

from diffcore.errors import UserError

if TYPE_CHECKING:
    from diffcore.weights import Checkpoint

Kind = Literal["pipeline", "component", "file"]


@attrs.frozen
class Located:
    """Where one component's weights are.

    ``kind`` is what was handed in; ``path`` the component's folder or the single file; ``pipeline``
    the pipeline folder (None unless ``kind`` is ``"pipeline"``); ``config`` the component's parsed
    ``config.json`` (None for single files and config-less folders).
    """

    kind: Kind
    component: str
    path: Path
    pipeline: Path | None
    config: dict[str, Any] | None

    @property
    def where(self) -> str:
        return str(self.path)

    @property
    def is_file(self) -> bool:
        return self.kind == "file"

    def part(self, name: str) -> Path | None:
        """The pipeline's ``name/`` sub-folder (``text_encoder_2``, ``tokenizer``, ``vae``), None when
        there is no pipeline or no such folder."""
        if self.pipeline is None or not (self.pipeline / name).exists():
            return None
        return self.pipeline / name

    def checkpoint(self) -> Checkpoint:
        """The component's tensors, read lazily."""
        from diffcore.weights import Checkpoint

        return Checkpoint(self.path)


def part_path(given: str | None, located: Located | None, name: str) -> Path | None:
    """A part's path: the one the job gives, else the pipeline's ``name/`` sub-folder of ``located``
    (None when neither)."""
    if given is not None:
        return Path(given)
    return located.part(name) if located is not None else None


def read_json(file: str | Path) -> dict[str, Any]:
    """A JSON object from ``file``; a UserError naming the file when it cannot be read or parsed."""
    try:
        data = json.loads(Path(file).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {Path(file).name}: {exc}", where=str(file)) from None
    if not isinstance(data, dict):
        raise UserError(f"{Path(file).name} does not hold a JSON object", where=str(file))
    return data


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.safetensors.index.json"))


def locate(path: str | Path, component: str = "transformer", *, what: str = "a checkpoint") -> Located:
    """Find ``component``'s weights under ``path`` (a pipeline folder, a component folder or a single
    file). ``what`` names the expected checkpoint in messages (``"a Flux checkpoint"``)."""
    given = Path(path).expanduser()
    expected = f"a diffusers pipeline folder (with {component}/), a {component} folder (config.json and weights) or a single .safetensors file"
    if not given.exists():
        raise UserError("no such file or folder", where=str(given), hint=f"give {what}: {expected}")
    if given.is_file():
        return Located("file", component, given, None, None)
    kind: Kind
    folder, pipeline, kind = given, None, "component"
    has_index = (given / "model_index.json").is_file()
    if (given / component).is_dir() and (has_index or not (given / "config.json").is_file()):
        folder, pipeline, kind = given / component, given, "pipeline"
    elif has_index:
        raise UserError(
            f"this pipeline folder has no {component}/ folder",
            where=str(given),
            hint=f"give {what}: a pipeline that includes its {component}, or the {component} folder itself",
        )
    config_file = folder / "config.json"
    if not config_file.is_file() and not _has_weights(folder):
        raise UserError(
            f"not {what}: this folder holds no {component}/ folder, no config.json and no .safetensors weights",
            where=str(folder),
            hint=f"give {expected}",
        )
    config = read_json(config_file) if config_file.is_file() else None
    return Located(kind, component, folder, pipeline, config)
