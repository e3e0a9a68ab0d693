from dcscale.cli import main

raise SystemExit(main())
