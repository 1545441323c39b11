"""`python -m losparse.report ...`: the documented name of the report command, `losparse.tools.report`."""
from .tools.report import main

if __name__ == "__main__":
    raise SystemExit(main())
