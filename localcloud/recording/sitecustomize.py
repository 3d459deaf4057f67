"""Switches on the AWS call recorder (localcloud.awscalls) in every Python process started with this
folder on PYTHONPATH and ATLAS_AWS_CALLS set: the IAM sufficiency test's ``atlas stage`` jobs."""
import os

if os.environ.get("ATLAS_AWS_CALLS"):
    from localcloud.awscalls import install

    install(os.environ["ATLAS_AWS_CALLS"])
