"""Overlap fingerprint (``abd --exclude-overlap-with``): false matches, margins, and speed.

Generates ``--per-scheme`` distinct phantoms of each scheme (MSD, NIH, ABD; 64×64×40, 6.25 mm
voxels; seeds 0..N-1 for MSD, N..2N-1 for NIH, 2N..3N-1 for ABD: an NIH and an ABD phantom of one
seed are the same image, a true match) and compares every pair with :func:`preprocessing.overlap.same_scan`
(distinct phantoms must never match), then the eight modified copies the issue lists of
``--copies`` phantoms (each must match). Prints, for docs/DATA.md:

* false matches / pairs, and the largest match fraction of a distinct pair (threshold 0.9);
* the largest slice correlations of distinct phantoms (coarse 16×16 signature, fine lattice) and
  the smallest of the copies' aligned slices, against the thresholds 0.99 / 0.8;
* seconds per fingerprint of a 512×512×100 volume (the cost on every volume, reading excluded).

Usage: ``python benchmarks/overlap_false_matches.py [--per-scheme 30] [--copies 5] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt4.io import to_json  # noqa: E402
from preprocessing import overlap, synthetic  # noqa: E402


def best_slice_correlations(a: overlap.Fingerprint, b: overlap.Fingerprint) -> tuple[float, float]:
    """Largest coarse and fine correlation between any slice of ``a`` (any mirroring) and any of ``b``."""
    theirs = b.slices.astype(np.float32).reshape(b.shape[2], -1)
    theirs_fine = b.fine.astype(np.float32).reshape(b.shape[2], -1)
    coarse = fine = -1.0
    for s, f, _ in overlap._mirrorings(a.slices.astype(np.float32), a.fine.astype(np.float32), a.mean):
        coarse = max(coarse, float((s.reshape(s.shape[0], -1) @ theirs.T).max()))
        fine = max(fine, float((f.reshape(f.shape[0], -1) @ theirs_fine.T).max()))
    return coarse, fine


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-scheme", type=int, default=30)
    parser.add_argument("--copies", type=int, default=5)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)

    phantoms, prints = [], []
    for offset, scheme in enumerate(("msd", "nih", "abd")):
        for seed in range(offset * args.per_scheme, (offset + 1) * args.per_scheme):
            hu, _, spacing = synthetic.phantom(size=64, n_slices=40, seed=seed, scheme=scheme)
            phantoms.append((scheme, seed, hu, spacing))
            prints.append(overlap.fingerprint_array(*synthetic.stored(hu, spacing, "RAS")))
    pairs = list(itertools.combinations(range(len(prints)), 2))
    assert not any(np.array_equal(phantoms[i][2], phantoms[j][2]) for i, j in pairs), "two phantoms are one image"
    t0 = time.perf_counter()
    fractions = [min(overlap.match_fraction(prints[i], prints[j]), overlap.match_fraction(prints[j], prints[i]))
                 for i, j in pairs]
    per_pair = (time.perf_counter() - t0) / len(pairs)
    false = [(phantoms[i][:2], phantoms[j][:2]) for (i, j), f in zip(pairs, fractions) if f >= overlap.MATCH_FRACTION]
    within = [(i, j) for i, j in pairs if phantoms[i][0] == phantoms[j][0]]
    slice_corr = [best_slice_correlations(prints[i], prints[j]) for i, j in within]

    copies = {v: [] for v in synthetic.COPY_VARIANTS}
    for index in range(min(args.copies, len(phantoms))):
        _, _, hu, spacing = phantoms[2 * args.per_scheme + index]  # ABD phantoms
        original = prints[2 * args.per_scheme + index]
        for variant in synthetic.COPY_VARIANTS:
            copy = overlap.fingerprint_array(*synthetic.modified_copy(variant, hu, spacing, seed=index))
            copies[variant].append(min(overlap.match_fraction(original, copy), overlap.match_fraction(copy, original)))

    big = np.random.default_rng(1).integers(-1024, 1500, size=(512, 512, 100), dtype=np.int16)
    t0 = time.perf_counter()
    overlap.fingerprint_array(big, np.diag([0.8, 0.8, 2.5, 1.0]))
    seconds_512 = time.perf_counter() - t0

    result = {
        "phantoms": len(prints), "pairs": len(pairs), "false_matches": len(false), "false_match_pairs": false[:10],
        "max_pair_fraction": max(fractions),
        "same_scheme_pairs": len(within),
        "max_slice_coarse_correlation_distinct": max(c for c, _ in slice_corr),
        "max_slice_fine_correlation_distinct": max(f for _, f in slice_corr),
        "copies_min_fraction": {v: min(f) for v, f in copies.items()},
        "thresholds": {"slice_correlation": overlap.SLICE_CORRELATION, "fine_correlation": overlap.FINE_CORRELATION,
                       "match_fraction": overlap.MATCH_FRACTION},
        "seconds_per_pair": per_pair, "seconds_per_fingerprint_512x512x100": seconds_512,
    }
    print(f"distinct phantoms: {len(prints)} ({args.per_scheme} per scheme), {len(pairs)} pairs: "
          f"{len(false)} false matches; largest match fraction {max(fractions):.3f} (threshold {overlap.MATCH_FRACTION})")
    print(f"same-scheme pairs ({len(within)}): largest slice correlation coarse "
          f"{result['max_slice_coarse_correlation_distinct']:.4f} (threshold {overlap.SLICE_CORRELATION}), fine "
          f"{result['max_slice_fine_correlation_distinct']:.4f} (threshold {overlap.FINE_CORRELATION})")
    for variant, values in copies.items():
        print(f"copy {variant:16s} smallest match fraction over {len(values)} phantoms: {min(values):.3f}")
    print(f"{per_pair * 1e3:.2f} ms per pair compared; {seconds_512:.2f} s per 512×512×100 fingerprint (reading excluded)")
    if args.json:
        Path(args.json).write_text(to_json(result, indent=2) + "\n")
    return 0 if not false and all(min(v) >= overlap.MATCH_FRACTION for v in copies.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
