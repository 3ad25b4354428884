import sys

from ghostvis_jax.serve.server import main

sys.exit(main())
