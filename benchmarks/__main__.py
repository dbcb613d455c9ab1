"""``python -m benchmarks``: the suite's one entry point."""

from benchmarks.run import main

raise SystemExit(main())
