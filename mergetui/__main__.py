"""Allow ``python -m mergetui``."""

from mergetui.cli import main

main()
