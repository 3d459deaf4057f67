"""Tissue Atlas pipeline library."""
