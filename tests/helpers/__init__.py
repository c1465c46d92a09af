"""Helpers shared by the real-data tests (stand-in image folders, vocabularies, tiny checkpoints)."""
