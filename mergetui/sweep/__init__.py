"""Parameter sweeps: merge and score many variants of a recipe, keep the best (``mergetui sweep``).

Above the engine and the evaluation (it drives both), below the CLI and the TUI.
"""
