import sys

from slmforge.cli import main

sys.exit(main())
