"""Calibration sources and evaluation corpora."""
