import sys

from escalator.world.app import main

sys.exit(main())
