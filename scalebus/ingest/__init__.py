"""Incremental copy from an object source (S3) into the data lake: ``plan`` decides (pure), ``engine`` copies."""
