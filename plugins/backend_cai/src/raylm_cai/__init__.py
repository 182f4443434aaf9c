"""raylm's `cai` backend: a Ray cluster of Cloudera Machine Learning applications, and `raylm cai deploy`."""
