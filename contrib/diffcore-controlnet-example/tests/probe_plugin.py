"""A test-only plugin: the ``probe`` callback records what the tests check from inside a run.

Under ``probe/`` in the output folder: ``initial-<module>.safetensors`` (the method's modules before
the first step), ``grads-rank<r>.jsonl`` (per step, the largest gradient left on a trainable
parameter after the optimizer step) and ``digest-rank<r>.json`` (a hash of each method module's
weights at the end, per rank)."""

from __future__ import annotations

import attrs

import diffcore


@attrs.define(kw_only=True)
class ProbeConfig:
    pass


def _probe(config: ProbeConfig):
    import hashlib
    import json

    import torch
    from safetensors.torch import save_file

    from diffcore.callbacks.base import Callback

    class Probe(Callback):
        def folder(self, ctx):
            path = ctx.output_dir / "probe"
            path.mkdir(parents=True, exist_ok=True)
            return path

        def on_train_start(self, ctx):
            for name, module in ctx.method_modules.items():
                with ctx.gathered(module.parameters()):
                    if ctx.is_main:
                        state = {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}
                        save_file(state, str(self.folder(ctx) / f"initial-{name}.safetensors"))

        def on_step_end(self, ctx, logs):
            left = max((float(p.grad.abs().max()) for p in ctx.trainable if p.grad is not None), default=0.0)
            with open(self.folder(ctx) / f"grads-rank{ctx.rank}.jsonl", "a") as f:
                f.write(json.dumps({"step": ctx.step, "max_grad": left}) + "\n")

        def on_train_end(self, ctx):
            digests = {}
            for name, module in ctx.method_modules.items():
                with ctx.gathered(module.parameters()):
                    h = hashlib.sha256()
                    for key, value in sorted(module.state_dict().items()):
                        h.update(key.encode())
                        h.update(value.detach().to(torch.float32).cpu().contiguous().numpy().tobytes())
                    digests[name] = h.hexdigest()
            (self.folder(ctx) / f"digest-rank{ctx.rank}.json").write_text(json.dumps(digests))

    return Probe()


@diffcore.hookimpl
def diffcore_register_callbacks():
    return [diffcore.CallbackSpec(name="probe", config=ProbeConfig, factory=_probe)]


@attrs.define(kw_only=True)
class PlainConfig:
    width: int = 8


def _plain(config: PlainConfig):
    from diffcore.testing import TinyModel

    return TinyModel(width=config.width)


@diffcore.hookimpl
def diffcore_register_models():
    # a model whose predict takes no residual, for the sidenet method's validate()
    return [diffcore.ModelSpec(name="plain-tiny", config=PlainConfig, factory=_plain)]
