"""Datasets over prepared folders and the image transform (SPEC §2)."""
