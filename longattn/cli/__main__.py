"""`python -m longattn.cli ...` = `longattn ...`."""
import sys

from .main import main

sys.exit(main())
