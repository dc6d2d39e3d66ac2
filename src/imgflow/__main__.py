from imgflow.cli import main

raise SystemExit(main())
