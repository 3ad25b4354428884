"""python -m ghostvis_jax.train --config configs/<experiment>.py [--config.key=value ...]"""

import logging
import sys

from absl import app
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


def _load_config_file(argv: list[str]):
    import importlib.util

    for i, arg in enumerate(argv):
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else (argv[i + 1] if arg == "--config" and
                                                                            i + 1 < len(argv) else None)
        if path:
            spec = importlib.util.spec_from_file_location("experiment_config", path.split(":", 1)[0])
            if spec is None:
                sys.exit(f"error: --config {path}: not a Python config file")
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except FileNotFoundError:
                sys.exit(f"error: --config {path}: no such file")
            return module.get_config()
    return None


if __name__ == "__main__":
    from ghostvis_jax.train.config import unknown_override

    config = _load_config_file(sys.argv)
    problem = config is not None and unknown_override(config, sys.argv[1:])
    if problem:
        sys.exit(f"error: {problem}")
    app.run(main)
