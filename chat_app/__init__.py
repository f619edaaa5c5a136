"""The chat app: engines, routing between model versions, and the Gradio UI."""
