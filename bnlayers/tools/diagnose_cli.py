"""The command line of `diagnose`.

A module of its own, which the package does not import, so that `python -m`
runs it cleanly:

    python -m bnlayers.tools.diagnose_cli model.keras data.npz [--batch-size 64] [--plot gap.png]

(installed as the console script `bnlayers-diagnose` too). Exit status: 0
healthy, 1 unhealthy, 2 bad arguments or files.
"""

import sys

from bnlayers.tools.diagnosis import main

if __name__ == "__main__":
    sys.exit(main())
