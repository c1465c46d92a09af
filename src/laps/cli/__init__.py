"""Command-line entry points of laps."""
