"""Train the repository's tiny vision transformer on scikit-learn's bundled digits images.

    python scripts/train_tiny_vit.py                    # writes allocator/assets/vit-digits/

Steps (all seeded; same result for the same torch build and thread count):
1. the digits images (``sklearn.datasets.load_digits``, 1,797 grey 8×8 images) split by index
   hash (``allocator.model.data.images.digits_split_of``) into train / calibration / evaluation; only
   ``train`` is used here, pixels scaled to [0, 1] and normalised with the fixed
   ``PIXEL_MEAN`` / ``PIXEL_STD``;
2. a ``ViTForImageClassification`` (patch 4 → 4 patches + CLS, module names of the ViT family:
   ``vit.layers.N.attention.q_proj``, ``mlp.fc1``, ``classifier`` ... in transformers 5)
   trained with AdamW, label smoothing and ±1-pixel random shifts of the training images;
3. accuracy of the saved weights on every split, written to the model card README.md and to
   ``training.json`` beside ``config.json`` / ``model.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import cast

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import transformers  # noqa: E402

from allocator.model.data.images import (  # noqa: E402
    PIXEL_MEAN,
    PIXEL_STD,
    digits_split_indices,
    load_digits_arrays,
    normalize_pixels,
)

OUT = Path(__file__).resolve().parents[1] / "allocator" / "assets" / "vit-digits"


def split_tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = load_digits_arrays()
    idx = digits_split_indices(split)
    return normalize_pixels(images[idx]), torch.as_tensor(targets[idx], dtype=torch.long)


def random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by (dy, dx) ∈ {−1, 0, 1}², filling with the background value."""
    background = (0.0 - PIXEL_MEAN) / PIXEL_STD
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=background)
    offs = torch.randint(0, 9, (x.shape[0],), generator=gen)
    out = torch.empty_like(x)
    for k in range(9):  # one slice per offset, not per image
        sel = offs == k
        out[sel] = padded[sel, :, k // 3:k // 3 + 8, k % 3:k % 3 + 8]
    return out


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(pixel_values=x[i:i + 256]).logits.argmax(-1)
                      for i in range(0, len(x), 256)])
    return float((pred == y).double().mean())


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout")
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()

    x_train, y_train = split_tensors("train")
    x_cal, y_cal = split_tensors("calibration")
    x_eval, y_eval = split_tensors("evaluation")
    config = transformers.ViTConfig(
        image_size=8, patch_size=args.patch, num_channels=1, hidden_size=args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden, hidden_dropout_prob=args.dropout,
        attention_probs_dropout_prob=args.dropout,
        id2label={i: str(i) for i in range(10)}, label2id={str(i): i for i in range(10)},
        qkv_bias=True, initializer_range=0.02)
    # Saved in config.json and read by allocator.model.data.data_for: this model's data set.
    setattr(config, "bitalloc_data", "sklearn-digits")  # noqa: B010 (not a declared field)
    model = transformers.ViTForImageClassification(config)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    per_epoch = math.ceil(len(x_train) / args.batch_size)
    total = args.epochs * per_epoch
    warmup = max(1, total // 20)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    step = 0
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        for s in range(0, len(perm), args.batch_size):
            sel = perm[s:s + args.batch_size]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, args.lr, warmup)
            logits = model(pixel_values=random_shift(x_train[sel], gen)).logits
            loss = loss_fn(logits, y_train[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
        if (epoch + 1) % 20 == 0 or epoch + 1 == args.epochs:
            print(f"epoch {epoch + 1}/{args.epochs} loss {float(loss.detach()):.3f} calibration acc "
                  f"{accuracy(model, x_cal, y_cal):.4f} ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
    train_seconds = time.perf_counter() - t0

    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    saved = transformers.ViTForImageClassification.from_pretrained(args.out, local_files_only=True)
    acc = {"train": accuracy(saved, x_train, y_train),
           "calibration": accuracy(saved, x_cal, y_cal),
           "evaluation": accuracy(saved, x_eval, y_eval)}
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in saved.modules())
    info = {
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "seed": args.seed, "threads": args.threads,
        "data": "sklearn.datasets.load_digits", "image_size": 8, "patch_size": args.patch,
        "num_channels": 1, "hidden": args.hidden, "intermediate": 4 * args.hidden,
        "layers": args.layers, "heads": args.heads, "params": n_params, "linear_modules": n_linear,
        "batch_size": args.batch_size, "epochs": args.epochs, "steps": total, "lr": args.lr,
        "weight_decay": args.weight_decay, "dropout": args.dropout,
        "label_smoothing": args.label_smoothing, "augmentation": "random shift by ±1 pixel",
        "save_dtype": "float32",
        "normalization": {"scale": "pixel / 16", "mean": PIXEL_MEAN, "std": PIXEL_STD},
        "split": {"rule": "sha256('sklearn-digits:<index>') mod 100: train < 70, "
                          "calibration 70-84, evaluation 85-99; only train is trained on",
                  "sizes": {"train": len(x_train), "calibration": len(x_cal),
                            "evaluation": len(x_eval)}},
        "accuracy": {k: round(v, 4) for k, v in acc.items()},
        "train_seconds": round(train_seconds, 1),
    }
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    (args.out / "README.md").write_text(model_card(info))
    print(json.dumps(info["accuracy"]), f"params {n_params}", f"{train_seconds:.0f}s")
    return 0


def model_card(info: dict[str, object]) -> str:
    acc = cast("dict[str, float]", info["accuracy"])
    patches = (8 // cast(int, info["patch_size"])) ** 2
    rows = [
        ("architecture", f"ViT: 8×8×1 input, patch {info['patch_size']} ({patches} patches + "
                         f"CLS), {info['layers']} layers, hidden {info['hidden']}, intermediate "
                         f"{info['intermediate']}, {info['heads']} heads, linear head over 10 "
                         f"classes"),
        ("parameters", f"{info['params']:,} ({info['linear_modules']} `Linear` modules), "
                       f"float32 `model.safetensors`"),
        ("input", f"`pixel_values` [B, 1, 8, 8] = (pixel / 16 − {PIXEL_MEAN}) / {PIXEL_STD} "
                  f"(no image processor)"),
        ("split", "sha256(\"sklearn-digits:<index>\") mod 100: train < 70, calibration 70–84, "
                  "evaluation 85–99; only train is trained on"),
        ("training", f"{info['epochs']} epochs × batch {info['batch_size']} ({info['steps']} "
                     f"steps), AdamW {info['lr']} cosine, weight decay {info['weight_decay']}, "
                     f"dropout {info['dropout']}, label smoothing {info['label_smoothing']}, "
                     f"±1-pixel random shifts, seed {info['seed']}, {info['threads']} thread: "
                     f"{info['train_seconds']} s"),
        ("accuracy (saved weights)", f"evaluation **{acc['evaluation']:.4f}**, calibration "
                                     f"{acc['calibration']:.4f}, train {acc['train']:.4f}"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""# vit-digits: a tiny ViT classifier for bitalloc's tests and benchmarks

A `ViTForImageClassification` trained from scratch by `scripts/train_tiny_vit.py` on the train
split of scikit-learn's bundled digits images (`sklearn.datasets.load_digits`: 1,797 grey 8×8
images, classes 0–9). It is the repository's classifier test object (the vision-transformer
case), small enough to estimate, quantize and evaluate on a CPU in seconds.

| | |
|---|---|
{table}

Rebuild with `python scripts/train_tiny_vit.py` (rewrites this directory); the exact settings
and environment are in `training.json`. Load it with
`allocator.model.loading.load_model("vit-digits")` and its data with
`allocator.model.data.DigitsData.from_split("calibration" | "evaluation")`.
"""


if __name__ == "__main__":
    raise SystemExit(main())
