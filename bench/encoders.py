"""Encoder speed on this CPU, and what the feature cache buys for a frozen encoder.

    python bench/encoders.py [--demos 10] [--root DIR] [--skip-epoch]

1. images/s of every `conf/encoder/*.yaml` (default variant) with the encoder's input at 224 px and at
   84 px (frozen encoders under no_grad, trainable ones forward only);
2. one epoch of BC (BC transformer, T=2) on `--demos` drawer-open demonstrations with a frozen DINOv2
   ViT-S/14: from pixels (timed on a few batches, extrapolated to the epoch) and from the feature cache
   (timed for the whole epoch), plus the cache build time and its peak memory.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = cfg.paths.output_dir = "/tmp"
    return cfg


def images_per_s(name: str, size: int, batch: int = 16) -> float | None:
    from hydra.utils import instantiate

    overrides = [f"encoder={name}", f"encoder.image_size={size}"]
    if name == "spawnnet":
        overrides.append(f"encoder.backbone.image_size={size}")
    try:
        enc = instantiate(compose(overrides).encoder).eval()
    except Exception as e:  # e.g. a size the patch grid cannot take
        print(f"  {name} at {size}px: {type(e).__name__}: {str(e)[:120]}")
        return None
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        enc(x[:2])
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < 3.0 or n < batch:
            enc(x)
            n += batch
    return n / (time.perf_counter() - start)


def _build_cache(args, queue) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from toolkit.encoders.cache import build_feature_cache

    cfg = compose(["encoder=dinov2"])
    torch.set_num_threads(2)
    start = time.perf_counter()
    path = build_feature_cache(instantiate(cfg.encoder), OmegaConf.to_container(cfg.encoder, resolve=True),
                               args[0], ["rgb_corner4"], progress=True)
    queue.put((str(path), time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def bc_epoch(data: Path, feature_path: Path | None, max_batches: int | None) -> tuple[float, int]:
    """Seconds for the batches run, and how many batches an epoch has."""
    from hydra.utils import instantiate

    cfg = compose(["encoder=dinov2", f"data.path={data}", "data.num_workers=0"])
    dm = instantiate(cfg.data)
    dm.feature_path = feature_path
    dm.setup("fit")
    policy = instantiate(cfg.policy, encoder=instantiate(cfg.encoder), shape_meta=dm.shape_meta, stats=dm.stats,
                         _convert_="all")
    opt = policy.configure_optimizers()["optimizer"]
    loader = dm.train_dataloader()
    start, n = time.perf_counter(), 0
    for batch in loader:
        loss = policy.compute_loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += 1
        if max_batches and n >= max_batches:
            break
    return time.perf_counter() - start, n, len(loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demos", type=int, default=10)
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--skip-epoch", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)

    names = sorted(p.stem for p in (ROOT / "conf" / "encoder").glob("*.yaml"))
    rows = []
    for name in names:
        rows.append((name, images_per_s(name, 224), images_per_s(name, 84)))
    lines = ["| encoder (default variant) | images/s at 224 px | images/s at 84 px |", "|---|---|---|"]
    def fmt(v: float | None) -> str:
        return f"{v:.1f}" if v else "n/a"

    lines += [f"| {n} | {fmt(a)} | {fmt(b)} |" for n, a, b in rows]
    table = "\n".join(lines)
    print(table)

    if not args.skip_epoch:
        from toolkit.collect import collect

        root = args.root or Path(tempfile.mkdtemp(prefix="bench_encoders_"))
        data = root / f"drawer-open-v3_{args.demos}demos.hdf5"
        cfg = compose([])
        collect(cfg.env, data, args.demos, num_envs=2)
        queue = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(target=_build_cache, args=((data,), queue))
        proc.start()
        cache, build_s, build_rss = queue.get()
        proc.join()
        pix_s, pix_n, epoch_batches = bc_epoch(data, None, max_batches=3)
        feat_s, feat_n, _ = bc_epoch(data, Path(cache), max_batches=None)
        pix_epoch = pix_s / pix_n * epoch_batches
        table2 = "\n".join([
            f"| BC epoch, frozen DINOv2 ViT-S/14, {args.demos} demos ({epoch_batches} batches of 64) | seconds |",
            "|---|---|",
            f"| from pixels (extrapolated from {pix_n} batches) | {pix_epoch:.0f} |",
            f"| from the feature cache | {feat_s:.1f} |",
            f"| speed-up | {pix_epoch / feat_s:.0f}x |",
            f"| cache build (once) | {build_s:.0f} s, peak RSS {build_rss:.0f} MB |",
        ])
        print(table2)
        table += "\n\n" + table2
        (root / "encoders.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
