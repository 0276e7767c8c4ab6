from h2k.cli import main

raise SystemExit(main())
