"""``python -m qoda_hvd``: the same as the ``qoda-hvd`` command."""
from qoda_hvd.cli import main

raise SystemExit(main())
