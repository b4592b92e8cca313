"""The inference pipeline every tool runs (the demo, ``eval_cascade.py``):

volume → slices (:mod:`minigpt4.inference.readers`: NIfTI / DICOM folder or zip, size limits,
orientation and normalisation of the training PNGs) → stage 1 pancreas box → crop → stage 2
P(tumor) → stage 3 tumor box → patient answer (:mod:`minigpt4.inference.pipeline`).
"""
