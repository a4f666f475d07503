from fastvl.cli import main

raise SystemExit(main())
