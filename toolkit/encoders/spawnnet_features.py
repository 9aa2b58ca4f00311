"""Look at what a SpawnNet encoder sees: for a few frames of a dataset, one PNG each with the input
frame, a PCA-to-RGB map of each projected backbone tap and of the final adapter features.

    python -m toolkit.encoders.spawnnet_features --data FILE.hdf5 --out DIR [--frames 4]
        [--camera rgb_corner4] [--checkpoint policy.ckpt | --backbone-weights dinov2_vits14_pretrain.pth]
        [--trust-pickled-code]

With ``--checkpoint`` the encoder (and its trained adapter) comes from a trained policy; otherwise a
fresh SpawnNetEncoder is built (random adapter; random backbone unless ``--backbone-weights``). The
PCA of each feature map is fitted over all the chosen frames together, so colours compare across frames.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from toolkit.datamodules.episode_file import episode_names, obs_group, open_episode_file
from toolkit.encoders.spawnnet import SpawnNetEncoder
from toolkit.errors import ToolkitError


def pca_rgb(maps: torch.Tensor) -> np.ndarray:
    """``[F, C, h, w]`` features -> ``[F, h, w, 3]`` in [0, 1]: the top 3 principal components over all
    frames and positions, each stretched to its 1st-99th percentile."""
    f, c, h, w = maps.shape
    x = maps.detach().float().permute(0, 2, 3, 1).reshape(-1, c)
    x = x - x.mean(dim=0, keepdim=True)
    k = min(3, c, x.shape[0])
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    y = x @ v[:k].T
    if k < 3:
        y = torch.cat([y, y.new_zeros(len(y), 3 - k)], dim=1)
    lo, hi = torch.quantile(y, 0.01, dim=0), torch.quantile(y, 0.99, dim=0)
    y = ((y - lo) / (hi - lo).clamp_min(1e-8)).clamp(0, 1)
    return y.reshape(f, h, w, 3).numpy()


def pick_frames(path: Path, camera: str, num: int) -> tuple[list[str], np.ndarray]:
    """``num`` frames evenly spread over the file's episodes: labels and uint8 ``[F, H, W, C]``."""
    with open_episode_file(path) as f:
        index = []
        names = episode_names(f)
        for name in names:
            obs = obs_group(f["data"][name])
            if camera not in obs:
                cams = sorted(k for k in obs if k.startswith("rgb_"))
                raise ToolkitError(f"{path}: episode {name} has no obs/{camera}; cameras: {', '.join(cams) or 'none'}")
            index += [(name, t) for t in range(obs[camera].shape[0])]
        if not index:
            raise ToolkitError(f"{path}: no frames")
        picks = [index[i] for i in np.unique(np.linspace(0, len(index) - 1, min(num, len(index))).round().astype(int))]
        from toolkit.datamodules.video import DecoderCache, read_images

        decoders = DecoderCache()
        frames = np.stack([read_images(obs_group(f["data"][n])[camera], [t], decoders)[0] for n, t in picks])
    return [f"{n}_t{t:04d}" for n, t in picks], frames


def build_encoder(args: argparse.Namespace) -> SpawnNetEncoder:
    from toolkit.encoders.weights import trusting_pickled_code

    # --trust-pickled-code: for the checkpoint and the weights files it (or --backbone-weights) names
    with trusting_pickled_code(getattr(args, "trust_pickled_code", False)):
        if args.checkpoint:
            from toolkit.policies.base import load_policy

            encoder = load_policy(args.checkpoint).encoder
            if not isinstance(encoder, SpawnNetEncoder):
                raise ToolkitError(f"{args.checkpoint}: the policy's encoder is {type(encoder).__name__}, not SpawnNetEncoder")
            return encoder
        from toolkit.encoders.dinov2 import DINOv2Encoder

        backbone = DINOv2Encoder(variant=args.variant, weights=args.backbone_weights, freeze=True,
                                 image_size=args.backbone_image_size)
    return SpawnNetEncoder(backbone, image_size=args.image_size)


def render(path: Path, frame: np.ndarray, panels: list[tuple[str, np.ndarray]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 1 + len(panels)
    fig, axes = plt.subplots(1, n, figsize=(2.4 * n, 2.6))
    for ax, (title, image) in zip(axes, [("input", frame), *panels]):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(prog="python -m toolkit.encoders.spawnnet_features", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="episode file (HDF5)")
    p.add_argument("--out", required=True, type=Path, help="folder for the PNGs")
    p.add_argument("--frames", type=int, default=4, help="frames to show, spread over the file")
    p.add_argument("--camera", default="rgb_corner4", help="obs key of the camera (rgb_<camera>)")
    p.add_argument("--checkpoint", help="trained policy checkpoint whose SpawnNet encoder to use")
    p.add_argument("--trust-pickled-code", action="store_true",
                   help="load a checkpoint (or weights) that pickles code: runs it (trusted files only)")
    p.add_argument("--backbone-weights", default=None, help="DINOv2 weights for a fresh encoder (path or auto)")
    p.add_argument("--variant", default="vits14", help="DINOv2 variant for a fresh encoder")
    p.add_argument("--image-size", type=int, default=224, help="adapter input size for a fresh encoder")
    p.add_argument("--backbone-image-size", type=int, default=224, help="backbone input size for a fresh encoder")
    args = p.parse_args(argv)
    if args.frames < 1:
        p.error("--frames must be at least 1")
    camera = args.camera if args.camera.startswith("rgb_") else f"rgb_{args.camera}"

    labels, frames = pick_frames(args.data, camera, args.frames)
    encoder = build_encoder(args).cpu().eval()
    images = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
    if encoder.in_channels == 4:
        depth_key = "depth_" + camera.removeprefix("rgb_")
        raise ToolkitError(f"the encoder takes RGB-D images; this command shows RGB cameras only ({depth_key} not read)")
    with torch.no_grad():
        feats = encoder.features(images)
    panels = [(f"block {t} (projected)", pca_rgb(m)) for t, m in zip(encoder.taps, feats["taps"])]
    panels.append(("adapter output", pca_rgb(feats["out"])))

    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (label, frame) in enumerate(zip(labels, frames)):
        path = args.out / f"spawnnet_{camera}_{label}.png"
        render(path, frame, [(title, maps[i]) for title, maps in panels])
        written.append(path)
        print(path)
    return written


if __name__ == "__main__":
    try:
        main()
    except ToolkitError as e:
        sys.exit(f"error: {e}")
