from fedsim_runner.cli import main

raise SystemExit(main())
