"""mergetui: merge fine-tuned language models from validated recipes.

The package is layered so that data flows one way:
``recipe`` → ``sources`` → ``methods`` → ``engine`` → (``evaluate``) → ``cli`` / ``tui``.
Nothing imports a layer above it, and nothing below ``cli``/``tui`` imports Textual.
Importing this package is cheap: torch and transformers are imported only where tensors are touched.
"""

__version__ = "0.1.0"
