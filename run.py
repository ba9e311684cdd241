"""Entry point: ``python run.py +experiment=noisy_mnist`` (add ``-m`` for a Hydra multirun)."""
import logging
import sys

import hydra
from omegaconf import DictConfig

from pmp_lightning.config import register_configs
from pmp_lightning.errors import PMPError
from pmp_lightning.pipeline import run

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except PMPError as err:  # bad input: one clear line, not a traceback
        logging.getLogger("run").error(f"{type(err).__name__}: {err}")
        sys.exit(1)


if __name__ == "__main__":
    main()
