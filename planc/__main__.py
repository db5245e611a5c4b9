"""`python -m planc`: the planc command line."""
import sys

from planc.cli import main

sys.exit(main())
