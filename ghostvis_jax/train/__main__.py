"""python -m ghostvis_jax.train --config configs/<experiment>.py [--config.key=value ...]"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/*.py)",
                                          lock_config=True)


def main(argv):
    del argv
    from ghostvis_jax.train.config import ConfigError
    from ghostvis_jax.train.loop import TrainingDiverged, run

    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file it writes at INFO
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger("absl").setLevel(logging.WARNING)
    if _CONFIG.value is None:
        sys.exit("error: --config is required (e.g. --config configs/demo_align.py)")
    try:
        run(_CONFIG.value)
    except (ConfigError, TrainingDiverged) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
