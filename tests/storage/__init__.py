"""Storage: partition values, commit records, locks, object stores, killed runs."""
