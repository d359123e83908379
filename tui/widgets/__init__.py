"""Widgets of the supervision TUI."""
