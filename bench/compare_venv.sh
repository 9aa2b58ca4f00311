#!/usr/bin/env bash
# Builds .venv-compare: the real lerobot and robomimic packages beside the toolkit, for bench/loading.py, and
# Stable-Baselines3 (its NatureCNN is the reference of toolkit.encoders.nature_cnn; bench/ppo_speed.py compares
# its PPO; --no-deps as the rest: its gymnasium, torch and numpy are .venv's, pandas is added).
# lerobot 0.4.4 pins torch<2.11 and robomimic 0.3.0 wants egl_probe (a CMake build); both run on the
# toolkit's torch, so they are installed without their pins (--no-deps) with the few packages their data
# loaders import, on top of .venv (chained with a .pth file, so torch is not installed twice). LeRobot
# decodes MP4 with torchcodec, which needs FFmpeg's shared libraries (Debian packages, needs root).
# robomimic's file_utils imports six, which robomimic does not list. torchcodec 0.17.0 is the release checked
# here with the toolkit's torch (its wheels are built against one torch release).
set -euo pipefail
cd "$(dirname "$0")/.."
test -x .venv/bin/python || { echo "run 'make install' first"; exit 1; }
if ! ldconfig -p | grep -q libavcodec.so; then
  # Debian's/Ubuntu's ffmpeg package brings the FFmpeg libraries of that release (what torchcodec loads)
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get install -y -q --no-install-recommends ffmpeg \
    || { $SUDO apt-get update -q && $SUDO apt-get install -y -q --no-install-recommends ffmpeg; }
fi
python3 -m venv .venv-compare
.venv/bin/python -c "import site; print(site.getsitepackages()[0])" \
  > "$(.venv-compare/bin/python -c 'import site; print(site.getsitepackages()[0])')/toolkit_venv.pth"
.venv-compare/bin/pip install -q --no-deps lerobot==0.4.4 robomimic==0.3.0 torchcodec==0.17.0 "accelerate>=1.10,<2" \
  stable-baselines3==2.9.2
.venv-compare/bin/pip install -q "datasets>=4,<5" "huggingface-hub>=0.34.2,<0.36" jsonlines deepdiff draccus==0.10.0 \
  einops termcolor tensorboardX psutil six pandas
.venv-compare/bin/python -c "
import lerobot, robomimic, torchcodec, stable_baselines3
import robomimic.utils.file_utils  # needs six
from lerobot.datasets.lerobot_dataset import LeRobotDataset
from torchcodec.decoders import VideoDecoder  # loads FFmpeg's libraries
print('lerobot', lerobot.__version__, 'robomimic', robomimic.__version__, 'torchcodec', torchcodec.__version__,
      'stable-baselines3', stable_baselines3.__version__)"
