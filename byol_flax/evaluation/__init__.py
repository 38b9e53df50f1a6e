"""Evaluation of BYOL representations (online monitors and the paper's protocols)."""
