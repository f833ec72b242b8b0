"""The steps of a job: prepare, plan, score shards in worker processes, commit; and how every stop is bounded."""
