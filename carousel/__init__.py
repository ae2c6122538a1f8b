"""carousel: shared code of the jobs, streaming queries and models (schemas, config, sessions, storage)."""

import os

# Great Expectations imports pyspark.pandas, which warns on every import unless this is set and then
# sets it to "1" itself: setting it first gives the same behaviour without the warning.
os.environ.setdefault("PYARROW_IGNORE_TIMEZONE", "1")
