"""One rule for which file identifies a checkpoint (issue 24): the scan's ``checkpoint_identities``
and the evaluation's ``checkpoint_identity`` hash the same file."""

from __future__ import annotations

import hashlib

from minigpt4.identity import checkpoint_identities, checkpoint_identity, content_sha256


def test_scan_and_evaluation_identify_a_checkpoint_by_the_same_file(tmp_path):
    project, export, plain = tmp_path / "checkpoint_best", tmp_path / "peft_export", tmp_path / "other"
    for folder, name in ((project, "model.safetensors"), (export, "adapter_model.safetensors"), (plain, "w.bin")):
        folder.mkdir()
        (folder / name).write_bytes(name.encode() * 3)
        (folder / "config.yaml").write_text("a: 1\n")  # not part of the identity of a checkpoint folder
    got = {c.stage: c.sha256 for c in checkpoint_identities({"a": project, "b": export, "c": plain})}
    assert got["a"] == hashlib.sha256(b"model.safetensors" * 3).hexdigest() == checkpoint_identity(str(project))["sha256"]
    assert got["b"] == hashlib.sha256(b"adapter_model.safetensors" * 3).hexdigest() \
        == checkpoint_identity(str(export))["sha256"]
    assert got["c"] == content_sha256(plain) != hashlib.sha256(b"w.bin" * 3).hexdigest()  # a folder, hashed whole
    assert checkpoint_identity(str(export))["resolved"] == str((export / "adapter_model.safetensors").resolve())
