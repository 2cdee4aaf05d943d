"""``python -m quatnn`` runs the ``quatnn`` command (also under ``torchrun -m quatnn``)."""

from quatnn.launch import main

raise SystemExit(main())
