from raytp.cli import main

raise SystemExit(main())
