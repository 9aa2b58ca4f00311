"""The one entry point: `python train.py [group=option ...] [field=value ...]` (see `--help`)."""

import hydra
from omegaconf import DictConfig

from toolkit.config import register_resolvers

register_resolvers()  # before Hydra composes: the data configs name converted files with ${source_name:...}


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    # Imported here so that `--help` and config errors answer without loading torch and Lightning.
    from toolkit.train import run

    return run(cfg)


if __name__ == "__main__":
    main()
