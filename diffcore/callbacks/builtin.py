"""The kernel's callbacks: checkpoints, metrics.jsonl, progress bar, TensorBoard, samples."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from diffcore.callbacks.base import Callback

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


class CheckpointCallback(Callback):
    def __init__(self, config: Any):
        self.config = config

    def on_step_end(self, ctx: Any, logs: dict[str, Any] | None) -> None:
        every = ctx.job.train.checkpoint_every
        if every and ctx.step % every == 0:
            self._save(ctx)

    def on_train_end(self, ctx: Any) -> None:
        # save_checkpoint sets last_checkpoint, which also covers a resumed run already at its end
        if ctx.last_checkpoint is None or ctx.last_checkpoint.name != f"step-{ctx.step}":
            self._save(ctx)

    def _save(self, ctx: Any) -> None:
        from diffcore.training.checkpoint import save_checkpoint

        path = save_checkpoint(ctx)
        for cb in ctx.callbacks:
            if cb is not self:
                cb.on_checkpoint(ctx, path)


class MetricsCallback(Callback):
    def __init__(self, config: Any):
        self.file: IO[str] | None = None

    def on_train_start(self, ctx: Any) -> None:
        if ctx.is_main:
            path = ctx.output_dir / "metrics.jsonl"
            _drop_rows_after(path, ctx.step)
            self.file = open(path, "a", encoding="utf-8")

    def on_step_end(self, ctx: Any, logs: dict[str, Any] | None) -> None:
        if self.file is not None and logs is not None:
            self.file.write(json.dumps(logs) + "\n")
            self.file.flush()

    def on_train_end(self, ctx: Any) -> None:
        self._close()

    def on_exception(self, ctx: Any, exc: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows up to ``step``: a resumed run logs the steps after its checkpoint again, so rows
    that an interrupted run wrote past its last checkpoint would otherwise appear twice."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row_step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            continue  # a line torn by a kill mid-write
        if isinstance(row_step, int) and row_step <= step:
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


class ProgressCallback(Callback):
    def __init__(self, config: Any):
        self.enabled = config.enabled
        self.bar = None

    def on_train_start(self, ctx: Any) -> None:
        if self.enabled and ctx.is_main:
            from tqdm import tqdm

            self.bar = tqdm(
                total=ctx.total_steps, initial=ctx.step, desc=ctx.job.name, unit="it", dynamic_ncols=True, mininterval=0.5
            )

    def on_step_end(self, ctx: Any, logs: dict[str, Any] | None) -> None:
        if self.bar is None:
            return
        self.bar.update(ctx.step - self.bar.n)
        if logs is not None:
            self.bar.set_postfix(progress_figures(logs), refresh=False)

    def on_train_end(self, ctx: Any) -> None:
        self._close()

    def on_exception(self, ctx: Any, exc: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def progress_figures(logs: dict[str, Any]) -> dict[str, str]:
    """What the progress bar shows beside its it/s: loss, lr, MFU (when known) and peak memory."""
    shown = {"loss": f"{logs['loss']:.4f}", "lr": f"{logs['lr']:.2e}"}
    if "mfu" in logs:
        shown["mfu"] = f"{100 * logs['mfu']:.1f}%"
    if "peak_mem_mib" in logs:
        shown["mem"] = f"{logs['peak_mem_mib'] / 1024:.1f}GiB"
    return shown


class TensorBoardCallback(Callback):
    def __init__(self, config: Any):
        self.config = config
        self.writer: SummaryWriter | None = None

    def on_train_start(self, ctx: Any) -> None:
        if not ctx.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.writer = SummaryWriter(self.config.log_dir or str(ctx.output_dir / "tensorboard"))

    def on_step_end(self, ctx: Any, logs: dict[str, Any] | None) -> None:
        if self.writer is None or logs is None:
            return
        for key, value in logs.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, logs["step"])

    def on_train_end(self, ctx: Any) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _sample_batch(config: Any) -> dict[str, Any]:
    import torch

    batch: dict[str, Any] = {}
    if config.prompts:
        batch["captions"] = [p for p in config.prompts for _ in range(config.count)]
    if config.labels:
        batch["labels"] = torch.tensor([lab for lab in config.labels for _ in range(config.count)])
    return batch


class SampleCallback(Callback):
    """Writes ``samples/step-<N>/*.png`` with :func:`diffcore.sampling.generate`."""

    def __init__(self, config: Any):
        self.config = config

    def on_step_end(self, ctx: Any, logs: dict[str, Any] | None) -> None:
        if self.config.every and ctx.step % self.config.every == 0:
            self.render(ctx)

    def on_train_end(self, ctx: Any) -> None:
        if self.config.at_end and not (self.config.every and ctx.step % self.config.every == 0):
            self.render(ctx)

    def render(self, ctx: Any) -> Path | None:
        from diffcore.sampling import generate

        batch = _sample_batch(self.config)
        if not batch:
            return None
        size = _default_size(ctx)
        height, width = self.config.height or size, self.config.width or size
        if self.config.inputs:
            from diffcore.inputs import load_inputs
            from diffcore.sampling import batch_size

            batch.update(
                load_inputs(
                    self.config.inputs, count=batch_size(batch), height=height, width=width,
                    device=ctx.device, where="$.callbacks[sample].inputs",
                )
            )
        if self.config.references or self.config.mask:
            from diffcore.inputs import load_edit_inputs
            from diffcore.sampling import batch_size

            batch.update(
                load_edit_inputs(
                    self.config.references, self.config.mask, count=batch_size(batch), height=height,
                    width=width, device=ctx.device, where="$.callbacks[sample].references",
                )
            )  # fmt: skip
        from diffcore.sampling import batch_size

        # image k has seed seed + k, as in `diffcore sample --seed`: the same image either way
        seeds = [self.config.seed + k for k in range(batch_size(batch))]
        pixels = _eval_generate(
            ctx,
            generate,
            batch=batch,
            height=height,
            width=width,
            steps=self.config.steps,
            sampler=self.config.sampler,
            sampler_options=self.config.sampler_options,
            guidance=self.config.guidance,
            seed=seeds,
        )
        folder = ctx.output_dir / "samples" / f"step-{ctx.step}"
        if ctx.is_main:
            names, texts = _describe_samples(self.config, seeds, ctx, f"{width}x{height}")
            _save(pixels, folder, "sample", "grid.png", names=names, texts=texts)
            print(f"samples: step {ctx.step}, {_weights(ctx)} weights, in {folder}", flush=True)
        return folder


def _describe_samples(config: Any, seeds: list[int], ctx: Any, size: str) -> tuple[list[str], list[dict[str, Any]]]:
    """File-name stems and PNG text of the sample callback's images, in batch order."""
    from diffcore.sampling import sample_name

    prompts = [p for p in config.prompts for _ in range(config.count)] if config.prompts else None
    labels = [lab for lab in config.labels for _ in range(config.count)] if config.labels else None
    names, texts = [], []
    for k, seed in enumerate(seeds):
        prompt = prompts[k] if prompts else None
        label = labels[k] if labels else None
        names.append(sample_name(k, seed, label=label, prompt=prompt))
        texts.append({"prompt": prompt, "label": label, "seed": seed, "sampler": config.sampler, "steps": config.steps,
                      "guidance": config.guidance, "size": size, "step": ctx.step, "weights": _weights(ctx)})
    return names, texts


def _save(pixels: Any, folder: Path, prefix: str, grid_name: str, **described: Any) -> None:
    from diffcore.sampling import image_grid, save_png

    save_png(pixels, folder, prefix=prefix, **described)
    image_grid(pixels).save(folder / grid_name)


def _default_size(ctx: Any) -> int:
    res = getattr(ctx.job.data.config, "resolution", None)
    return int(res) if isinstance(res, int) else 512


def _weights(ctx: Any) -> str:
    """Which weights :func:`_eval_generate` samples with: "ema" or "raw"."""
    return "raw" if ctx.ema is None else "ema"


def _eval_generate(ctx: Any, generate: Any, **kwargs: Any) -> Any:
    """Generate with the training model whole (ZeRO-3 gathered), with the EMA weights when there is
    an EMA, through the method's ``predict`` (its extra inputs included); ``generate`` puts the
    backbone in eval mode and back."""
    import torch

    with ctx.evaluating(), torch.no_grad():
        return generate(ctx.model, ctx.scheduler, method=ctx.method, **kwargs)


class ClassAgreementCallback(Callback):
    """The quickstart's quality figure (synthetic data): class agreement of generated samples."""

    def __init__(self, config: Any):
        self.config = config
        self.result: dict[str, Any] | None = None

    def on_train_end(self, ctx: Any) -> None:
        import torch

        from diffcore.data.synthetic import classify
        from diffcore.sampling import generate

        names = list(getattr(ctx.dataset, "class_names", []))
        if not names:
            return
        n = self.config.per_class
        labels = torch.arange(len(names)).repeat_interleave(n)
        size = _default_size(ctx)
        pixels = _eval_generate(
            ctx,
            generate,
            batch={"labels": labels},
            height=size,
            width=size,
            steps=self.config.steps,
            sampler=self.config.sampler,
            sampler_options=self.config.sampler_options,
            guidance=self.config.guidance,
            seed=self.config.seed,
        )
        images = pixels.float().cpu()
        agree = (classify(images, names) == labels).float()
        with_form = (classify(images, names, check_form=True) == labels).float()
        per_class = {name: float(agree[i * n : (i + 1) * n].mean()) for i, name in enumerate(names)}
        score = float(agree.mean())
        self.result = {
            "class_agreement": score,
            "class_and_form_agreement": float(with_form.mean()),
            "per_class": per_class,
            "samples": int(labels.numel()),
            "weights": _weights(ctx),
        }
        if ctx.is_main:
            folder = ctx.output_dir / "samples" / "final"
            for i, name in enumerate(names):
                _save(pixels[i * n : (i + 1) * n], folder, name.replace(" ", "-"), f"grid-{name.replace(' ', '-')}.png")
            (ctx.output_dir / "quality.json").write_text(json.dumps(self.result, indent=2))
            print(
                f"quality ({self.result['weights']} weights): class agreement {score:.3f} over {labels.numel()} samples "
                f"({', '.join(f'{k} {v:.2f}' for k, v in per_class.items())}); "
                f"with the form checked too: {self.result['class_and_form_agreement']:.3f}",
                flush=True,
            )
