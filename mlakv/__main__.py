import logging
import sys

from .cli import main

logging.basicConfig(level=logging.INFO, format="%(message)s")
sys.exit(main())
