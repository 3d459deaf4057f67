"""The emulated-AWS demo harness (moto server, the local Step Functions/Batch stand-in).

Only from a checkout: not in the Lambda asset or the Batch images."""
