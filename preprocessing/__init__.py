"""Turn NIH Pancreas-CT, MSD Task07 and AbdomenCT-1K volumes into PNG slices + JSON annotations.

Command line: ``python -m preprocessing msd|nih|abd|tc|tc-import|synthetic|report`` (see
:mod:`preprocessing.__main__`). Readers of the output use :func:`read_prepared` only.

Frames and indices (details in :mod:`preprocessing.volumes`): PNGs are in radiological display
orientation derived from the affine (anterior at the top, the patient's right on the image
left); boxes are inclusive ``[x1, y1, x2, y2]`` pixel indices in that PNG; ``slice_index`` is
the index along the *stored* axial axis of the image file (for DICOM: the stack sorted by
position along the slice normal, inferior → superior for axial series), never renumbered, so a
NIfTI stored with an inferior-pointing axial axis keeps its own numbering.

Modules: volumes (NIfTI/DICOM reading, orientation, grid checks), slices (boxes, ratios,
records, THE selection function), normalize, splits, pipeline (msd/nih/abd), output_folder (which
files of an output folder a run owns), tc, synthetic, report, layout (THE reader). Nothing here imports torch.
"""

from preprocessing.layout import dataset_name, read_prepared

__all__ = ["dataset_name", "read_prepared"]
