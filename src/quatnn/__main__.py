"""``python -m quatnn`` runs the ``quatnn`` command (also under ``torchrun -m quatnn``)."""

from quatnn.cli import main

raise SystemExit(main())
