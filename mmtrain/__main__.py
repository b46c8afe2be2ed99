import sys

from mmtrain.cli import main

sys.exit(main())
