import sys

from perfusion.cli import main

sys.exit(main())
