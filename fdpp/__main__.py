"""python -m fdpp: the fdpp command line."""
import sys

from fdpp.cli import main

sys.exit(main())
