"""The application ``spark-submit`` runs: the ``batchscore spark`` command, its options after the file.

    spark-submit --master spark://host:7077 "$(python -c 'import batchscore.spark.submit as s; print(s.__file__)')" \\
        --config job.yaml

Exit codes are the CLI's (see docs/commands.md).
"""

import sys

from batchscore.cli import main

if __name__ == "__main__":
    main(["spark", *sys.argv[1:]], prog_name="batchscore")
