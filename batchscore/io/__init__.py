"""Where a job reads and writes: storage, the input's files and schema, the output's parts, its lease and guards."""
