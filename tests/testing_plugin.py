"""An in-process plugin for tests/test_testing.py: one model and one callback, registered without pip."""

from __future__ import annotations

import attrs

import diffcore


@attrs.define(kw_only=True)
class TinyConfig:
    width: int = 8


@attrs.define(kw_only=True)
class NoteConfig:
    filename: str = "note.txt"


def _model(config: TinyConfig):
    from diffcore.testing import TinyModel

    return TinyModel(width=config.width)


def _note(config: NoteConfig):
    from diffcore.callbacks.base import Callback

    class Note(Callback):
        def on_train_end(self, ctx):
            if ctx.is_main:
                (ctx.output_dir / config.filename).write_text(str(ctx.step))

    return Note()


@diffcore.hookimpl
def diffcore_register_models():
    return [diffcore.ModelSpec(name="testing-tiny", config=TinyConfig, factory=_model)]


@diffcore.hookimpl
def diffcore_register_callbacks():
    return [diffcore.CallbackSpec(name="testing-note", config=NoteConfig, factory=_note)]
