"""The pipeline: completion records, the local runner, the cloud stage job."""
