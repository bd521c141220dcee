"""Rendering of interval reports: rich for terminals, plain text otherwise."""
