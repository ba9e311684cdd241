"""Entry point: ``python run.py +experiment=noisy_mnist`` (add ``-m`` for a Hydra multirun)."""
import logging
import sys

import hydra
from omegaconf import DictConfig

from pmp_lightning.config import check_settings, register_configs
from pmp_lightning.errors import PMPError

register_configs()  # light: torch and Lightning are imported only once Hydra has composed the config


def user_error(err: BaseException | None) -> PMPError | None:
    """The project's own error behind ``err``: Hydra wraps what a ``_target_`` raises in InstantiationException."""
    while err is not None and not isinstance(err, PMPError):
        err = err.__cause__
    return err


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    logging.captureWarnings(True)  # a run's warnings reach run.log as well as the terminal
    try:
        check_settings(cfg)  # before torch and Lightning are loaded: a bad setting is named in about a second
        from pmp_lightning.pipeline import run

        run(cfg)
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        logging.getLogger("run").error(f"{type(cause).__name__}: {cause}")  # bad input: one clear line, not a traceback
        sys.exit(1)


if __name__ == "__main__":
    main()
