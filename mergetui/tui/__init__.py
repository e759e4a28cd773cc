"""The guided merge TUI (Textual). A front end only: merge math lives in ``methods``, everything it
does has a headless equivalent in the CLI."""
