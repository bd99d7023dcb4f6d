from zdproxy.cli import main

raise SystemExit(main())
