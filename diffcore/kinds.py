"""The kinds of component a plugin can provide: the one table the records, the hook
specifications, the job sections and ``diffcore plugins`` are derived from.

Adding a kind is one row here (and its record class in :mod:`diffcore.records`).
"""

from __future__ import annotations

import attrs

from diffcore import records


@attrs.frozen
class Kind:
    """One kind of component: its name, record class, registration hook and job section."""

    name: str
    plural: str
    record: type[records.Record]
    #: the hook that yields this kind's records
    hook: str
    #: the job section a record of this kind fills, as a dotted path ("train.optimizer"), or None
    section: str | None
    description: str
    #: the section is a list of records (callbacks), not one
    repeated: bool = False


def _kind(
    name: str,
    record: type[records.Record],
    section: str | None,
    description: str,
    *,
    plural: str | None = None,
    repeated: bool = False,
) -> Kind:
    plural = plural or name + "s"
    return Kind(name, plural, record, f"diffcore_register_{plural}", section, description, repeated)


_ALL = (
    _kind("model", records.ModelSpec, "model",
          "Model architectures: the backbone that trains plus how it encodes images and conditions."),
    _kind("scheduler", records.SchedulerSpec, "scheduler",
          "Noise schedules with their training objectives (timestep sampling, targets, weighting)."),
    _kind("adapter", records.AdapterSpec, "adapter", "Adapters injected into a frozen model (LoRA, DoRA, LoKr...)."),
    _kind("dataset", records.DatasetSpec, "data", "Sources of training examples."),
    _kind("callback", records.CallbackSpec, "callbacks",
          "Reactions to training events: logging, checkpoints, sampling.", repeated=True),
    _kind("method", records.MethodSpec, "method", "Training methods: how a batch becomes a loss and which parameters train."),
    _kind("optimizer", records.OptimizerSpec, "train.optimizer", "Optimizers beyond the built-in ones (8-bit, schedule-free...)."),
    _kind("autoencoder", records.AutoencoderSpec, None, "Image autoencoder families that latent architectures ask for by name."),
    _kind("sampler", records.SamplerSpec, None,
          "Samplers that walk a noise schedule from noise to an image (Euler, DPM-Solver++...)."),
    _kind("text_encoder", records.TextEncoderSpec, None,
          "Text encoder families (CLIP, OpenCLIP, T5, decoder LLMs) that architectures ask for by name."),
    _kind("loss_weighting", records.LossWeightingSpec, "train.loss_weighting",
          "Per-sample loss weightings (min-SNR, EDM...) chosen independently of the noise schedule."),
    _kind("command", records.CommandSpec, None, "`diffcore <name>` subcommands."),
)

#: every kind by name, in listing order
KINDS: dict[str, Kind] = {kind.name: kind for kind in _ALL}

