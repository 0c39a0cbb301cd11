import sys

from gmar.cli import main

sys.exit(main())
