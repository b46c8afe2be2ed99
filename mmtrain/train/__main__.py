"""`python -m mmtrain.train --recipe R.yaml --out DIR` — the entry point the launchers start on every rank."""

import sys

from mmtrain.commands.train import main

sys.exit(main())
