"""`python -m bench [--sections makespan,overhead,scale] [--quick] [--out PATH]`."""

import sys

from bench.common import main

sys.exit(main())
