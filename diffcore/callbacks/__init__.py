"""Callbacks: reactions to training events. Plugins subclass :class:`Callback`."""

from diffcore.callbacks.base import Callback

__all__ = ["Callback"]
