"""Searches over compression settings (regularized evolution for PIC-PQ)."""
