"""The AWS side: S3, the catalog, release, upload, access for analysts, operations."""
