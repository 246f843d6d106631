"""`python -m qmqpd` is `qmqpd`."""

import sys

from qmqpd.cli import main

sys.exit(main())
