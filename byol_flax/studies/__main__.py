"""``python -m byol_flax.studies``: the study runner's command line (byol_flax.studies.runner)."""

import sys

from byol_flax.studies.runner import main

if __name__ == "__main__":
    sys.exit(main())
