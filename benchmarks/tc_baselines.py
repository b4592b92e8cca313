"""Tumor-classification baselines on a prepared TC folder, next to a trained checkpoint (CPU).

    python benchmarks/tc_baselines.py --data data/TC_crops [--checkpoint output/tc_cpu/checkpoint_best]

Uses the folder's own volume-level split (train / val / test from ``python -m preprocessing
tc-import``) and reports held-out (test) accuracy and ROC AUC for:

1. ``hist``: crop width, height, area, aspect and a 32-bin intensity histogram + mean/std →
   gradient boosting (SPEC §4 item 10: the crop size and histogram alone separate the TC classes,
   because yes = MSD and no = NIH come from different scanners/phases); the same code
   (:mod:`minigpt4.evaluation.baselines`) prints this row in ``eval_classification.py``'s Table 2;
2. ``cnn``: a 3-layer CNN on 64×64 grayscale crops (Adam 1e-3, 8 epochs, batch 64), ~1 min CPU;
3. ``model``: the checkpoint (a project checkpoint folder whose ``config.yaml`` holds its model
   config): greedy yes/no answers → accuracy, P(yes) at the first answer token → AUC.

Writes a JSON summary with ``--json``. Seeds are fixed; runtime is printed per method.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minigpt4.evaluation.baselines import fit_histogram_baseline, histogram_probabilities  # noqa: E402
from minigpt4.evaluation.baselines import labels_of as _labels  # noqa: E402
from preprocessing.layout import read_prepared  # noqa: E402


def _gray(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"), dtype=np.uint8)


def _metrics(y: np.ndarray, p_yes: np.ndarray, pred: Optional[np.ndarray] = None) -> dict:
    from sklearn.metrics import roc_auc_score

    pred = (p_yes >= 0.5).astype(int) if pred is None else pred
    return {"accuracy": float((pred == y).mean()), "auc": float(roc_auc_score(y, p_yes)), "n": int(len(y))}


def run_hist(train: list, test: list, seed: int) -> dict:
    """The package's Table 2 baseline (minigpt4/evaluation/baselines.py), timed."""
    t0 = time.perf_counter()
    p = histogram_probabilities(fit_histogram_baseline(train, seed), test)
    return {**_metrics(_labels(test), p), "seconds": time.perf_counter() - t0}


def _crops(records: Sequence[dict], size: int = 64) -> torch.Tensor:
    out = [np.asarray(Image.fromarray(_gray(r["image"])).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
           for r in records]
    return torch.from_numpy(np.stack(out))[:, None]


def run_cnn(train: list, test: list, seed: int, epochs: int = 8) -> dict:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    x, y = _crops(train), torch.from_numpy(_labels(train)).float()
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(64, 1),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=generator).split(64):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x[idx]).squeeze(1), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        p = torch.sigmoid(net(_crops(test)).squeeze(1)).numpy()
    return {**_metrics(_labels(test), p), "seconds": time.perf_counter() - t0}


def run_model(checkpoint: Path, test: list, batch_size: int) -> dict:
    from minigpt4.config import load_config
    from minigpt4.evaluation import classification_metrics, predict_classification
    from minigpt4.models.minigpt_v2 import build_model

    t0 = time.perf_counter()
    cfg = load_config(checkpoint / "config.yaml")
    cfg.model.init_from, cfg.model.ckpt = None, str(checkpoint)
    model = build_model(cfg.model, "cpu")
    rows = predict_classification(model, test, batch_size=batch_size, with_probability=True)
    metrics = classification_metrics(rows, n_boot=0)
    y = _labels(test)
    p = np.array([r["p_yes"] for r in rows], dtype=float)
    m = cfg.model
    label = (f"MiniGPT checkpoint: ViT {m.vision.depth}×{m.vision.width} at {m.vision.image_size} px, LLaMA "
             f"{m.text.num_layers}×{m.text.hidden_size}, LoRA r {m.lora.r} on {','.join(m.lora.target_modules)}; "
             f"trained {cfg.run.max_epoch} epochs, best by val accuracy")
    return {"accuracy": float(metrics["accuracy"]), "auc": _metrics(y, p)["auc"],
            "accuracy_at_p0.5": _metrics(y, p)["accuracy"], "n": len(rows), "seconds": time.perf_counter() - t0,
            "label": label}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="prepared TC folder (python -m preprocessing tc-import)")
    parser.add_argument("--checkpoint", help="trained checkpoint folder to score on the same test split")
    parser.add_argument("--methods", nargs="+", default=["hist", "cnn"], choices=["hist", "cnn"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", help="write the summary here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    train = read_prepared(args.data, "tumor_classification", "train")
    test = read_prepared(args.data, "tumor_classification", "test")
    summary = {"data": str(args.data), "n_train": len(train), "n_test": len(test),
               "test_yes_fraction": float(_labels(test).mean()), "results": {}}
    if "hist" in args.methods:
        summary["results"]["hist_gbm"] = run_hist(train, test, args.seed)
    if "cnn" in args.methods:
        summary["results"]["cnn_3layer"] = run_cnn(train, test, args.seed)
    if args.checkpoint:
        summary["results"]["model"] = run_model(Path(args.checkpoint), test, args.batch_size)
    for name, r in summary["results"].items():
        print(f"{name:12s} accuracy {r['accuracy']:.3f}  AUC {r['auc']:.3f}  ({r['seconds']:.0f} s)")
    if args.json:
        from minigpt4.io import write_json_atomic

        write_json_atomic(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
