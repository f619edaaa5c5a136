"""The Gradio front end: one module per tab, assembled by `build_ui`."""

from .blocks import build_ui

__all__ = ["build_ui"]
