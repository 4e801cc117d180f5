"""`python -m fastdiff` runs the `fastdiff` command line."""
import sys

from fastdiff.app.cli import main

sys.exit(main())
