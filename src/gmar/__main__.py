import sys

from gmar.frontends.cli import main

sys.exit(main())
