"""`python -m mmtrain.train --recipe R.yaml --out DIR` — the entry point the launchers start on every rank."""

import sys

from mmtrain.train import preemption

preemption.install()  # before the slow imports: a SIGUSR1 / SIGTERM during start-up is kept, not lost or fatal

from mmtrain.train.entry import main  # noqa: E402

sys.exit(main())
