"""Screens of the supervision TUI (modals, the escalation inbox)."""
