"""loopterm.tui: the command line, headless progress and the Textual app. Only this layer imports textual."""
