import sys

from vfsd.cli import main

sys.exit(main())
