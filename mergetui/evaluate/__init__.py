"""Did the merge work? Load models, generate from prompts side by side, score task files.

Sits above the engine and below the CLI/TUI: it imports no Textual, and torch/transformers only
inside the functions that need them.
"""
