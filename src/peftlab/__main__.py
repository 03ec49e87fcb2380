from peftlab.cli import main

raise SystemExit(main())
