"""What ``scan.py`` writes: per volume ``report.json``, ``boxes.nii.gz``, ``seg.dcm`` (DICOM
input) and ``montage.png``; across volumes ``summary.csv`` and ``scan.json``; plus the
"already done" check (sharding across ranks: :mod:`minigpt4.distributed`). Independent of how the model runs: it takes the
volume's geometry and the model's per-slice answers.

The model's answers come as the inference pipeline's
:class:`~minigpt4.inference.pipeline.VolumeResult`.

The input contract (the display-frame ↔ voxel mapping and the checks of the results against
it) is :mod:`minigpt4.inference.geometry`; checkpoint and package identities are
:mod:`minigpt4.identity`. Modules: :mod:`~minigpt4.scan_outputs.volume_files` (one volume's files),
:mod:`~minigpt4.scan_outputs.run` (folders, summary, fingerprints).
"""

from minigpt4.identity import CheckpointIdentity, checkpoint_identities, content_sha256, package_versions
from minigpt4.inference.geometry import (
    DECISIONS,
    VolumeGeometry,
    check_results,
    geometry_from_affine,
    geometry_from_image,
    geometry_from_volume,
    slice_boxes,
)
from minigpt4.scan_outputs.run import (
    BOXES_FILE,
    DONE_FILE,
    ERROR_FILE,
    MONTAGE_FILE,
    REPORT_FILE,
    SEG_FILE,
    SUMMARY_COLUMNS,
    collect_summary,
    error_row,
    fingerprint,
    is_done,
    mark_done,
    summary_row,
    write_scan_json,
    write_summary,
    write_volume_error,
    write_volume_outputs,
)
from minigpt4.scan_outputs.volume_files import (
    box_label_volume,
    build_report,
    most_suspicious,
    read_dicom_source,
    seg_frames,
    write_box_nifti,
    write_dicom_seg,
    write_montage,
    write_report,
)

__all__ = [
    "DECISIONS", "CheckpointIdentity", "VolumeGeometry", "check_results", "slice_boxes",
    "geometry_from_affine", "geometry_from_image", "geometry_from_volume",
    "BOXES_FILE", "DONE_FILE", "ERROR_FILE", "MONTAGE_FILE", "REPORT_FILE", "SEG_FILE", "SUMMARY_COLUMNS",
    "checkpoint_identities", "collect_summary", "content_sha256", "error_row", "fingerprint", "is_done",
    "mark_done", "package_versions", "summary_row", "write_scan_json",
    "write_summary", "write_volume_error", "write_volume_outputs",
    "box_label_volume", "build_report", "most_suspicious", "read_dicom_source", "seg_frames",
    "write_box_nifti", "write_dicom_seg", "write_montage", "write_report",
]
