"""Pure domain rules: no I/O, no clock, no settings."""
