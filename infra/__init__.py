"""The CDK app's constructs, one module per concern; :mod:`infra.stacks` composes them."""
