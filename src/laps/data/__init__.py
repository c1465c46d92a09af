"""Datasets, data modules and data generation for LAPS."""
