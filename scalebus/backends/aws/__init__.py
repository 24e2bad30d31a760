"""AWS adapters: the read-only S3 source ``scalebus ingest`` copies from. The only package that imports boto3."""
