"""The Gradio front end: one module per tab, assembled by `build_ui`."""

from .blocks import CSS, build_ui

__all__ = ["CSS", "build_ui"]
