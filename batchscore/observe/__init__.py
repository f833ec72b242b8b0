"""What a job tells people about itself: metrics, lineage, the run report with its profiles and drift."""
